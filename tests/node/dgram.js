// An unmodified Node UDP server: every worker binds the same port (shared by the primary)
// and answers each datagram with `pong:<worker id>:<datagram>`.
const cluster = require('cluster');
const dgram = require('dgram');
const sock = dgram.createSocket('udp4');
sock.on('message', (msg, rinfo) => {
  sock.send(`pong:${cluster.worker.id}:${msg}`, rinfo.port, rinfo.address);
});
sock.bind(+process.env.PORT || 0, '127.0.0.1', () => {
  console.log(`bound ${sock.address().port}`);
});
