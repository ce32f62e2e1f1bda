// An unmodified Node http app: answers with its cluster worker id in a header.
// PORT (default 0: every worker's listen(0) shares one port through the primary).
// GET /delay/MS answers after MS milliseconds.
const cluster = require('cluster');
const http = require('http');
const port = +process.env.PORT || 0;
const server = http.createServer((req, res) => {
  const m = /^\/delay\/(\d+)/.exec(req.url);
  setTimeout(() => {
    res.setHeader('x-worker-id', String(cluster.worker.id));
    res.setHeader('x-worker-pid', String(process.pid));
    res.end(`hello from ${cluster.worker.id}\n`);
  }, m ? +m[1] : 0);
});
server.on('error', (e) => {
  console.log(`server error ${e.code}`);
  process.exit(3);
});
server.listen(port, '127.0.0.1', () => {
  console.log(`listening ${server.address().port} isWorker=${cluster.isWorker}`);
});
