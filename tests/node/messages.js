// process.send both ways: greets the primary, and echoes every message it gets with its id.
const cluster = require('cluster');
process.on('message', (m) => process.send({ echo: m, id: cluster.worker.id }));
process.send({ hello: cluster.worker.id, isWorker: cluster.isWorker });
