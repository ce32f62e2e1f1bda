// Worker 1 leaves on its own once listening (cluster.worker.disconnect(): close, then
// exitedAfterDisconnect, which the primary must answer before the worker can go).
const cluster = require('cluster');
const http = require('http');
const server = http.createServer((req, res) => {
  res.setHeader('x-worker-id', String(cluster.worker.id));
  res.end('ok\n');
});
server.listen(+process.env.PORT || 0, '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
  if (cluster.worker.id === 1) cluster.worker.disconnect();
});
