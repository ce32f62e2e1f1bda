// Says when its first connection arrives, then blocks its event loop (as a long synchronous
// handler would) until the gate file named by argv[2] is gone, so that whatever the primary
// hands it meanwhile waits unread in its channel. Then it serves everything: 'bye\n', close.
// It blocks in 2 ms sleeps rather than spinning, and for at most 60 s (longer than the test's
// own waits, so that the test, not this, gives up first).
const fs = require('fs');
const net = require('net');
const gate = process.argv[2];
const nap = new Int32Array(new SharedArrayBuffer(4));
let first = true;
const server = net.createServer((sock) => {
  if (first) {
    first = false;
    process.send({ blocked: true });
    const deadline = Date.now() + 60000;
    while (fs.existsSync(gate) && Date.now() < deadline) {
      Atomics.wait(nap, 0, 0, 2);
    }
  }
  sock.end('bye\n');
});
server.listen(0, '127.0.0.1', () => process.send({ port: server.address().port }));
