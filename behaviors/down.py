"""down: the proxy is down, until the behavior is replaced."""

import vaurien


class Down(vaurien.Dummy):
    """The proxy is down: its listener is closed (new connections are
    refused) and open connections are closed, until another behavior is
    set; it can only be set alone (100% of the mix)."""

    name = 'down'
    options = {}

    def activate(self, server):
        server.go_down()

    def deactivate(self, server):
        server.go_up()


vaurien.Behavior.register(Down)
