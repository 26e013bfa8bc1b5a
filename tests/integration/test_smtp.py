"""aiosmtpd and smtplib through the smtp plugin and plain tcp."""

import smtplib
import socket
import time
import unittest
from email.message import EmailMessage

from tests.integration import support


def message(size=1000, subject='hello'):
    msg = EmailMessage()
    msg['From'] = 'alice@example.com'
    msg['To'] = 'bob@example.com'
    msg['Subject'] = subject
    body = ''.join('line %d of the message\n' % i for i in range(size))
    msg.set_content(body + '.\n..\n.leading dot\n')
    return msg


class SMTPTest(support.ProxiedTestCase):

    PROTOCOL = 'smtp'

    @classmethod
    def start_backend(cls):
        return support.SMTPServer()

    def smtp(self, proxy, timeout=support.TIMEOUT):
        client = smtplib.SMTP('127.0.0.1', proxy.port, timeout=timeout)
        self.addCleanup(client.close)
        return client

    def deliver(self, proxy, subject, size=1000):
        count = len(self.backend.messages)
        client = self.smtp(proxy)
        client.ehlo()
        msg = message(size, subject)
        client.send_message(msg)
        client.send_message(message(3, subject + '-2'))
        client.quit()
        deadline = time.time() + 5
        while len(self.backend.messages) < count + 2 and \
                time.time() < deadline:
            time.sleep(0.02)
        got = self.backend.messages[count]
        self.assertEqual(got[0], 'alice@example.com')
        self.assertEqual(got[1], ['bob@example.com'])
        self.assertEqual(got[2].replace(b'\r\n', b'\n'),
                         msg.as_bytes().replace(b'\r\n', b'\n'))

    def test_delivery_plugin(self):
        with support.captured_warnings() as warnings:
            self.deliver(self.proxy, 'plugin')
            self.deliver(self.proxy, 'plugin-big', size=100000)
        self.assertEqual(warnings, [])
        self.assertGreater(self.proxy.server.exchange_counts['dummy'], 10)

    def test_delivery_tcp(self):
        self.deliver(self.tcp, 'tcp')

    def test_pipelining(self):
        sock = socket.create_connection(self.proxy.address,
                                        timeout=support.TIMEOUT)
        self.addCleanup(sock.close)
        data = b''

        def read_until(marker):
            got = b''
            while marker not in got:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
            return got

        data += read_until(b'220 ')
        sock.sendall(b'EHLO x\r\nMAIL FROM:<a@example.com>\r\n'
                     b'RCPT TO:<b@example.com>\r\nDATA\r\n')
        data += read_until(b'354')
        sock.sendall(b'Subject: piped\r\n\r\nbody\r\n.\r\nQUIT\r\n')
        data += read_until(b'221')
        self.assertEqual(data.count(b'250 '), 4)
        self.assertEqual(self.proxy.server.exchange_counts['dummy'], 6)

    # behaviors, as smtplib reports them

    def test_error_451_on_message(self):
        client = self.smtp(self.proxy)
        client.ehlo()
        # MAIL, RCPT and DATA pass, the message fails
        self.proxy.set('error', {'error': {'warmup': 3}})
        with self.assertRaises(smtplib.SMTPResponseException) as caught:
            client.send_message(message())
        self.assertEqual(caught.exception.smtp_code, 451)
        self.proxy.set('dummy')
        self.assertEqual(client.rset()[0], 250)
        self.assertEqual(client.noop()[0], 250)

    def test_error_on_command(self):
        client = self.smtp(self.proxy)
        client.ehlo()
        self.proxy.set('error', {'error': {'code': 452}})
        with self.assertRaises(smtplib.SMTPResponseException) as caught:
            client.send_message(message())
        self.assertEqual(caught.exception.smtp_code, 452)

    def test_error_421(self):
        client = self.smtp(self.proxy)
        client.ehlo()
        self.proxy.set('error', {'error': {'code': 421}})
        self.assertEqual(client.mail('alice@example.com')[0], 421)
        with self.assertRaises(smtplib.SMTPServerDisconnected):
            client.noop()

    def test_hang_third_command(self):
        client = self.smtp(self.proxy, timeout=0.5)
        client.ehlo()
        client.noop()
        self.proxy.set('hang')
        with self.assertRaises((socket.timeout, smtplib.SMTPException)):
            client.noop()

    def test_delay(self):
        client = self.smtp(self.proxy)
        client.ehlo()
        self.proxy.set('delay', {'delay': {'sleep': 0.3}})
        start = time.time()
        self.assertEqual(client.noop()[0], 250)
        self.assertGreaterEqual(time.time() - start, 0.3)

    def test_abort(self):
        client = self.smtp(self.proxy)
        client.ehlo()
        self.proxy.set('abort')
        with self.assertRaises(smtplib.SMTPServerDisconnected):
            client.noop()

    def test_blackout(self):
        client = self.smtp(self.proxy)
        client.ehlo()
        self.proxy.set('blackout')
        with self.assertRaises(smtplib.SMTPServerDisconnected):
            client.noop()


if __name__ == '__main__':
    unittest.main()
