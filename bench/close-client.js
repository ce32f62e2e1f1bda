'use strict';
// Connection-per-request load client that accounts for every request it sends.
// A copy of shared/bench/node/close-client.js (the Node anchor's client) with three
// changes for cluster-rs: a 200 answer counts as ok with either hello body (Node's
// `hello world\n` or cluster-rs's `hello from worker <id>\n`); answers are tallied by
// their `x-worker-id` header (the per-worker split); and REQUESTS can bound the run by a
// request count instead of time.
// Every request ends in exactly one outcome: ok, reset, eof (closed with no complete
// answer), timeout (no answer within TIMEOUT_MS), connect error or other. wrk 4.1 cannot
// see a request that is never answered and never closed; this client drains at the end.
//   PORT [8080]  CONNS [64] concurrent connections  SECONDS [10]  TIMEOUT_MS [3000]
//   REQUESTS [0] stop starting requests after this many (0: SECONDS decides)
const net = require('node:net');
const { performance } = require('node:perf_hooks');

const port = Number(process.env.PORT || 8080);
const conns = Number(process.env.CONNS || 64);
const seconds = Number(process.env.SECONDS || 10);
const timeoutMs = Number(process.env.TIMEOUT_MS || 3000);
const limit = Number(process.env.REQUESTS || 0);
const request = 'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n';
// Node's answer is chunked (`c\r\nhello world\n\r\n0\r\n\r\n`); cluster-rs's has a content-length.
// The bodies of Node's server.js, cluster-cli hello, and the axum/hyper/std examples.
const okBody = /\r\n\r\n(?:[0-9a-f]+\r\n)?(?:hello world\n|hello from worker \d+\n|Hello, World!)/;
const workerHeader = /\r\nx-worker-id: *(\d+)\r\n/i;

const outcomes = { ok: 0, reset: 0, eof: 0, timeout: 0, connect: 0, other: 0 };
const byWorker = new Map(); // x-worker-id -> ok answers
const failures = []; // "outcome@ms" for every non-ok request
const start = performance.now();
const deadline = start + seconds * 1000;
let started = 0;
let running = conns;

function finish(outcome, received) {
  outcomes[outcome]++;
  if (outcome !== 'ok') {
    failures.push(`${outcome}@${Math.round(performance.now() - start)}ms`);
    return;
  }
  const m = workerHeader.exec(received);
  const id = m ? m[1] : '-';
  byWorker.set(id, (byWorker.get(id) || 0) + 1);
}

function oneRequest() {
  if ((limit > 0 && started >= limit) || (limit === 0 && performance.now() >= deadline)) {
    if (--running === 0) report();
    return;
  }
  started++;
  let settled = false;
  let connected = false;
  let received = '';
  const socket = net.connect({ host: '127.0.0.1', port });
  const settle = (outcome) => {
    if (settled) return;
    settled = true;
    clearTimeout(timer);
    socket.destroy();
    finish(outcome, received);
    setImmediate(oneRequest);
  };
  const timer = setTimeout(() => settle('timeout'), timeoutMs);
  socket.setNoDelay(true);
  socket.setEncoding('latin1');
  socket.on('connect', () => {
    connected = true;
    socket.write(request);
  });
  socket.on('data', (chunk) => { received += chunk; });
  socket.on('end', () => {
    settle(received.startsWith('HTTP/1.1 200') && okBody.test(received) ? 'ok' : 'eof');
  });
  socket.on('error', (err) => {
    if (!connected) settle('connect');
    else settle(err.code === 'ECONNRESET' || err.code === 'EPIPE' ? 'reset' : 'other');
  });
  socket.on('close', () => settle('eof'));
}

function report() {
  const elapsed = (performance.now() - start) / 1000;
  const total = Object.values(outcomes).reduce((a, b) => a + b, 0);
  const fields = Object.entries(outcomes).map(([k, v]) => `${k}=${v}`).join(' ');
  const split = [...byWorker.entries()]
    .sort((a, b) => Number(a[0]) - Number(b[0]))
    .map(([id, n]) => `${id}:${n}`).join(',') || '-';
  process.stdout.write(
    // elapsed includes the drain: requests still open at the deadline are waited
    // for (up to TIMEOUT_MS), so it exceeds SECONDS when one hangs.
    `CLIENTRESULT total=${total} ${fields} seconds_with_drain=${elapsed.toFixed(2)} ` +
    `rps=${(total / elapsed).toFixed(0)} split=${split} ` +
    `failures=${failures.slice(0, 20).join(',') || '-'}\n`);
}

for (let i = 0; i < conns; i++) oneRequest();
