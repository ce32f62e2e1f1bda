// An unmodified Node http app listening on a unix socket path (SOCK).
const cluster = require('cluster');
const http = require('http');
const server = http.createServer((req, res) => {
  res.setHeader('x-worker-id', String(cluster.worker.id));
  res.end('unix hello\n');
});
server.listen(process.env.SOCK, () => console.log(`listening ${process.env.SOCK}`));
