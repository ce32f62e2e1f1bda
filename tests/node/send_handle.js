// Sends the primary the first connection its server gets, with a message, then closes that
// server: Node's socket list makes the close wait until the primary says it holds none of the
// sockets it was sent. Reports each step with process.send.
const cluster = require('cluster');
const net = require('net');
const id = cluster.worker.id;
const server = net.createServer((socket) => {
  process.send({ sending: id }, socket);
  server.close(() => process.send({ closed: id }));
});
server.listen(0, '127.0.0.1', () => process.send({ port: server.address().port }));
