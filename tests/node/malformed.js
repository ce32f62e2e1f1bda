// Worker 1 writes a line that is not JSON onto its IPC channel; the others serve http.
const cluster = require('cluster');
const fs = require('fs');
const http = require('http');
if (cluster.worker.id === 1) {
  fs.writeSync(process.channel.fd, 'this is not json\n');
  setInterval(() => {}, 1000);
} else {
  const server = http.createServer((req, res) => {
    res.setHeader('x-worker-id', String(cluster.worker.id));
    res.end('ok\n');
  });
  server.listen(+process.env.PORT || 0, '127.0.0.1', () => console.log(`listening ${server.address().port}`));
}
