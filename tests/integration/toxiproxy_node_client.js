'use strict';
// vaurien.py server driven by toxiproxy-node-client, the npm package, as a
// Node program using Toxiproxy would drive it.  test_toxiproxy_clients.py
// runs it:
//
//     node toxiproxy_node_client.js API_URL REDIS_HOST:PORT
//
// with VAURIEN_NODE_MODULES naming the node_modules folder that holds the
// package.  It prints one JSON object, what the client saw at each step,
// for the Python test to check; any unexpected failure exits 1.
const path = require('path');

const modules = process.env.VAURIEN_NODE_MODULES;
if (!modules) {
  console.error('VAURIEN_NODE_MODULES must name the node_modules folder ' +
                'holding toxiproxy-node-client');
  process.exit(2);
}
const { Toxiproxy } = require(path.join(modules, 'toxiproxy-node-client'));

// What a call that should fail threw: its class and message (the client
// says "Request failed with status code N" for any non-2xx answer).
async function failure(call) {
  try {
    await call();
  } catch (error) {
    return { name: error.constructor.name, message: error.message };
  }
  return null;
}

async function main() {
  const [url, redis] = process.argv.slice(2);
  const toxiproxy = new Toxiproxy(url);
  const seen = {};
  const body = { name: 'node', listen: '127.0.0.1:0',
                 upstream: 'localhost:6379' };

  seen.version = await toxiproxy.getVersion();
  const proxy = await toxiproxy.createProxy(body);
  seen.created = proxy.toJson();
  seen.duplicate = await failure(() => toxiproxy.createProxy(body));
  seen.missing = await failure(() => toxiproxy.get('no-such-proxy'));
  seen.names = Object.keys(await toxiproxy.getAll());
  seen.got = (await toxiproxy.get('node')).toJson();
  seen.disabled = (await proxy.update({ enabled: false })).toJson();
  seen.enabled = (await proxy.update({ enabled: true })).toJson();

  const latency = await proxy.addToxic({
    type: 'latency', attributes: { latency: 100, jitter: 10 } });
  seen.latency = latency.toJson();
  seen.duplicateToxic = await failure(() => proxy.addToxic({
    type: 'latency', attributes: { latency: 1 } }));
  seen.badType = await failure(() => proxy.addToxic({ type: 'no_such' }));
  seen.badStream = await failure(() => proxy.addToxic({
    type: 'latency', stream: 'sideways' }));
  seen.gotToxic = (await proxy.getToxic(latency.name)).toJson();
  // as the client's own tests update: the whole toxic, attributes changed
  seen.updated = (await latency.update(Object.assign(latency.toJson(), {
    attributes: { latency: 200 } }))).toJson();
  // the client's own test: size_variation as large as average_size
  seen.slicer = (await proxy.addToxic({ type: 'slicer', attributes: {
    average_size: 1000, size_variation: 1000, delay: 1000 } })).toJson();
  await latency.remove();
  seen.removedToxic = await failure(() => proxy.getToxic(latency.name));

  await proxy.update({ enabled: false });
  await toxiproxy.reset();
  seen.afterReset = (await toxiproxy.get('node')).toJson();

  seen.populated = Object.values(await toxiproxy.populate([
    { name: 'node_a', listen: '127.0.0.1:0', upstream: 'localhost:6379' },
    { name: 'node_b', listen: '127.0.0.1:0', upstream: 'localhost:6380',
      enabled: false }])).map((each) => each.toJson());
  // Toxiproxy answers {"proxies": null} to an empty array, and the client
  // then fails to iterate it, as it does against Toxiproxy itself
  seen.populateEmpty = await failure(() => toxiproxy.populate([]));

  await proxy.remove();
  seen.removed = await failure(() => toxiproxy.get('node'));

  // vaurien's protocol field: errors in redis' own words
  const redisProxy = await toxiproxy.createProxy({
    name: 'node_redis', listen: '127.0.0.1:0', upstream: redis,
    protocol: 'redis' });
  seen.redis = redisProxy.toJson();
  seen.redisToxic = (await redisProxy.addToxic({
    type: 'error', name: 'oom',
    attributes: { message: 'OOM command not allowed (a toxic)' } })).toJson();

  console.log(JSON.stringify(seen));
}

main().catch((error) => {
  console.error(error && error.stack ? error.stack : String(error));
  process.exit(1);
});
