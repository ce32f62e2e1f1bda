// An unmodified Node net echo server, prefixing each reply with the worker id.
const cluster = require('cluster');
const net = require('net');
const server = net.createServer((sock) => {
  sock.on('data', (d) => sock.write(`${cluster.worker.id}:${d}`));
});
server.listen(0, '127.0.0.1', () => console.log(`listening ${server.address().port}`));
