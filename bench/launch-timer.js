'use strict';
// Start-up timer: `node bench/launch-timer.js COMMAND [ARGS...]`.
// Runs COMMAND through `bash -c 'printf "T0 $EPOCHREALTIME"; exec COMMAND'`, so "process
// start" is the wall-clock time just before the exec of COMMAND, in the same process (Node's
// own spawn costs ~5 ms here and is not counted). Timestamps COMMAND's stdout lines and
// prints one line once TIMER_COUNT lines have matched TIMER_READY_RE:
//   STARTUP ms_to_ready=<exec -> last ready line> ms_first_fork=<exec -> first
//   TIMER_FORK_RE line, or -> pid=<pid>
// then stops the process with SIGTERM (SIGKILL after 5 s) and SIGKILLs any of its
// children (workers) still running 2 s after it exited. Exits 1 if the process dies or
// TIMER_TIMEOUT_MS passes first. The child's output is copied to TIMER_LOG if set.
const { spawn } = require('node:child_process');
const fs = require('node:fs');

const count = Number(process.env.TIMER_COUNT || 1);
const readyRe = new RegExp(process.env.TIMER_READY_RE || '^READY');
const forkRe = process.env.TIMER_FORK_RE ? new RegExp(process.env.TIMER_FORK_RE) : null;
const timeoutMs = Number(process.env.TIMER_TIMEOUT_MS || 20000);
const log = process.env.TIMER_LOG ? fs.openSync(process.env.TIMER_LOG, 'w') : null;
const [cmd, ...args] = process.argv.slice(2);

const { performance } = require('node:perf_hooks');
const wallMs = () => performance.timeOrigin + performance.now();
let t0 = null; // wall-clock ms just before the exec, from the child's T0 line
const ms = (t) => (t - t0).toFixed(2);
const children = (pid) => {
  try {
    return fs.readdirSync(`/proc/${pid}/task`).flatMap((t) =>
      fs.readFileSync(`/proc/${pid}/task/${t}/children`, 'utf8').split(' ').filter(Boolean).map(Number));
  } catch { return []; }
};
const alive = (pid) => {
  try { return !/^\d+ \(.*\) Z/.test(fs.readFileSync(`/proc/${pid}/stat`, 'utf8')); } catch { return false; }
};

const child = spawn('bash', ['-c', 'printf "T0 %s\\n" "$EPOCHREALTIME"; exec "$@"', 'launch-timer', cmd, ...args],
  { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C' } });
let seen = 0;
let firstFork = null;
let done = false;
let workers = [];
let buf = '';
let exited = false;

function stop(code, line) {
  if (done) return;
  done = true;
  workers = children(child.pid);
  if (line) process.stdout.write(line + '\n');
  child.kill('SIGTERM');
  const killTimer = setTimeout(() => child.kill('SIGKILL'), 5000);
  const after = () => {
    clearTimeout(killTimer);
    setTimeout(() => {
      for (const w of workers) if (alive(w)) { try { process.kill(w, 'SIGKILL'); } catch { /* gone */ } }
      process.exit(code);
    }, workers.some(alive) ? 2000 : 0);
  };
  if (exited) after(); else child.on('exit', after);
}

child.stdout.on('data', (chunk) => {
  const now = wallMs();
  if (log) fs.writeSync(log, chunk);
  buf += chunk.toString('latin1');
  let nl;
  while ((nl = buf.indexOf('\n')) >= 0) {
    const line = buf.slice(0, nl);
    buf = buf.slice(nl + 1);
    if (t0 === null && line.startsWith('T0 ')) { t0 = Number(line.slice(3)) * 1000; continue; }
    if (forkRe && firstFork === null && forkRe.test(line)) firstFork = now;
    if (readyRe.test(line) && ++seen === count && !done) {
      stop(0, `STARTUP ms_to_ready=${ms(now)} ms_first_fork=${firstFork === null ? '-' : ms(firstFork)} pid=${child.pid}`);
    }
  }
});
child.stderr.on('data', (chunk) => { if (log) fs.writeSync(log, chunk); });
child.on('exit', (code, signal) => {
  exited = true;
  if (!done) {
    done = true;
    process.stderr.write(`launch-timer: ${cmd} exited (${code ?? signal}) after ${seen}/${count} ready lines\n`);
    process.exit(1);
  }
});
setTimeout(() => {
  process.stderr.write(`launch-timer: ${seen}/${count} ready lines after ${timeoutMs} ms\n`);
  stop(1, null);
}, timeoutMs).unref();
