// Tells the primary about each connection it takes, then answers it and closes it.
const cluster = require('cluster');
const net = require('net');
let served = 0;
const server = net.createServer((sock) => {
  served += 1;
  process.send({ served, id: cluster.worker.id });
  sock.end('bye\n');
});
server.listen(0, '127.0.0.1', () => process.send({ port: server.address().port }));
