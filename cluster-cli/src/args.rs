//! Command-line arguments (clap derive). Parsing of values lives here too, so that a bad
//! value is clap's usage error (exit 2), not a runtime failure.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use cluster_core::{ListenAddr, ListenSpec, Policy};
use cluster_master::{Coalesce, LoopScheduling, Protocol, RestartPolicy, RoundRobinConfig};

/// The stable log formats, shown at the end of `spawn --help`.
const LOG_FORMATS: &str = "\
Log lines (stdout unless noted; one per event, flushed at each line):
  [master] pid P: starting N workers: PROGRAM ARGS... (policy rr|sockets passed as LISTEN_FDS)
  [master] workers speak Node's cluster protocol (HOW)   (only then; HOW is --protocol node or auto's reason)
  [master] pre-bound ADDR as fd N (LISTEN_FDNAMES name listenI)
  [master] worker W (pid P) forked in slot S
  [master] worker W (pid P) online
  [master] worker W (pid P) ready (READY=1)
  [master] worker W (pid P) status: TEXT             (STATUS= sent to NOTIFY_SOCKET)
  [master] worker W (pid P) listening on ADDR
  [master] worker W (pid P) channel closed
  [master] worker W (pid P) dropped: REASON
  [master] worker W (pid P) exited with code C, after disconnect|crashed
  [master] worker W (pid P) exited on signal N (SIGNAME), after disconnect|crashed
  [master] slot S restarting in MSms
  [master] slot S errored: REASON
  [master] reload done
  [master] reload failed: REASON
  [master] message from worker W (pid P): N bytes   (at most 5 per worker per second, then:)
  [master] worker W (pid P) sent N more messages (B bytes) not shown, in MSms
  [master] SIGNAME: ACTION
  [master] stopped (clean)|stopped (not clean: REASON)   (REASON also on stderr, exit 1)
  [worker W pid P] LINE      (a worker's stdout line; its stderr lines go to stderr)
Fatal errors: one line `cluster-cli: REASON` on stderr, exit 1.

Readiness: a worker is ready when it listens through the master, or sends READY=1 to
NOTIFY_SOCKET (every worker gets one, as under systemd); a PROGRAM (not node) that has not
said online and does neither is ready --ready-delay after it started. A rolling reload waits
for readiness and is done when every old worker has exited. With --watchdog, WATCHDOG_USEC is
set and a ready worker that never said online (not hello, native or Node workers) and sends
no WATCHDOG=1 for that long is killed and restarted.

Socket activation: sockets passed to the master (LISTEN_FDS for its pid) are its own: a
worker listening on one's address gets it without a bind; --listen NAME passes one on.
  [master] inherited ADDR as NAME (socket activation)

Under systemd (NOTIFY_SOCKET set): READY=1 once every worker is ready, RELOADING=1 and
READY=1 around a HUP reload (Type=notify-reload works), STOPPING=1 on stop, STATUS= lines,
and WATCHDOG=1 at half WATCHDOG_USEC. See docs/systemd.md.

Workers: the built-in hello worker and programs that link cluster-worker speak the channel
(--policy, --window, --ack-timeout, --max-servers-per-worker apply to them). Any other program
(serving --listen sockets, or binding PORT itself when --port is given) is sent --stop-signal
to stop. Each worker runs in its own process group, so a terminal's Ctrl-C reaches the master
alone.

Signals: TERM, INT, QUIT = graceful stop (disconnect all, SIGKILL after --shutdown-timeout);
a second TERM/INT/QUIT = forced stop (SIGKILL now); HUP = rolling reload (errored slots
start afresh);
TTIN / TTOU = one worker more / less.";

/// Run a program as a cluster of workers, the way Node's `cluster` does.
#[derive(Debug, Parser)]
#[command(name = "cluster-cli", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a master that runs PROGRAM (default: the built-in hello worker) N times.
    #[command(after_help = LOG_FORMATS)]
    Spawn(Box<SpawnArgs>),
    /// Run the built-in hello HTTP worker (standalone, or as a worker of a cluster-rs master).
    Hello(HelloArgs),
}

/// How many workers to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerCount {
    /// As many as CPUs this process may use (affinity and cgroup quota).
    Auto,
    /// Exactly this many (at least 1).
    Fixed(usize),
}

#[derive(Debug, Args)]
pub struct SpawnArgs {
    /// Number of workers, or `auto` for the CPUs this process may use.
    #[arg(short = 'n', long, value_name = "N|auto", default_value = "auto", value_parser = parse_workers)]
    pub workers: WorkerCount,

    /// How listening sockets are shared: rr (master accepts and hands off), shared (workers
    /// accept on one socket), reuseport (one SO_REUSEPORT socket per slot).
    #[arg(long, value_name = "rr|shared|reuseport", default_value = "rr", value_parser = parse_policy)]
    pub policy: Policy,

    /// The IPC protocol of the workers: native (cluster-worker programs), node (unmodified
    /// Node.js programs: Node's own cluster IPC), or auto: node when PROGRAM's basename is
    /// node or nodejs (also as `env [..] node`), or PROGRAM is a script whose #! line names
    /// node; native otherwise.
    #[arg(long, value_name = "native|node|auto", default_value = "auto", value_parser = parse_protocol)]
    pub protocol: ProtocolChoice,

    /// Round-robin hand-offs in flight per worker (Node's is 1): room for batches, which a
    /// worker fills only while it answers (see --stall-after).
    #[arg(long, value_name = "N", default_value_t = RoundRobinConfig::default().window,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub window: usize,

    /// A worker that has left a round-robin hand-off unanswered this long (ms) is dealt no
    /// more while another worker answers, whatever room its window has, so a worker whose
    /// event loop is blocked takes in what arrives meanwhile, not a whole window (when no
    /// worker with room answers, the windows bound it). 0: off, only --window limits.
    #[arg(long, value_name = "MS", default_value_t = millis(cluster_master::DEFAULT_STALL_AFTER))]
    pub stall_after: u64,

    /// Node workers: while every worker has at least --coalesce-min round-robin hand-offs
    /// not answered yet, the master pauses up to this long (µs, at most 1000) before it waits
    /// again, and deals what arrived meanwhile in one pass instead of waking (and preempting
    /// a busy worker) for each connection. Only under load; a worker with fewer turns it off.
    /// 0: off. (Native workers answer in batches; no pause saves them a wake-up.)
    #[arg(long, value_name = "US", default_value_t = micros(Coalesce::default().delay),
          value_parser = clap::value_parser!(u64).range(..=micros(Coalesce::MAX_DELAY)))]
    pub coalesce_us: u64,

    /// Unanswered hand-offs every worker must have before the master pauses (see
    /// --coalesce-us).
    #[arg(long, value_name = "N", default_value_t = Coalesce::default().min_unanswered,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub coalesce_min: usize,

    /// Delay before restarting a crashed worker, in ms (doubles per fast crash).
    #[arg(long, value_name = "MS", default_value_t = millis(RestartPolicy::default().initial_delay))]
    pub restart_delay: u64,

    /// Cap on the restart delay, in ms.
    #[arg(long, value_name = "MS", default_value_t = millis(RestartPolicy::default().max_delay))]
    pub restart_max_delay: u64,

    /// Consecutive fast crashes (see --min-uptime) before a slot is given up (errored).
    #[arg(long, value_name = "N", default_value_t = RestartPolicy::default().max_fast_crashes,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_restarts: u32,

    /// A worker that ran this long (ms) before crashing does not count as a fast crash.
    #[arg(long, value_name = "MS", default_value_t = millis(RestartPolicy::default().min_uptime))]
    pub min_uptime: u64,

    /// How long (ms) a stopping worker may take to finish before it is killed.
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    pub shutdown_timeout: u64,

    /// A PROGRAM worker (not node) that has not said online and neither listens through the
    /// master nor sends READY=1 to NOTIFY_SOCKET is ready this long (ms) after it started (0:
    /// at once). For a program that sends READY=1, set it above the program's slowest start.
    #[arg(long, value_name = "MS", default_value_t = millis(cluster_master::DEFAULT_READY_DELAY))]
    pub ready_delay: u64,

    /// How long (ms) a reload's new worker may take to become ready before the reload fails.
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    pub ready_timeout: u64,

    /// Give every worker WATCHDOG_USEC for this period (ms): a ready one that never said
    /// online (any program, not a native or Node worker) and sends no WATCHDOG=1 to
    /// NOTIFY_SOCKET for that long is killed as hung and restarted.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub watchdog: Option<u64>,

    /// How long (ms) a worker may leave a round-robin hand-off unanswered before it counts as
    /// stuck: it is killed, restarted, and its connections go to the others. Each hand-off has
    /// its own deadline. Lower detects a hung worker sooner but kills one that is merely slow
    /// (a stop-the-world pause, swapping); until then the clients dealt to it before it
    /// stalled (see --stall-after) wait on it.
    /// Default 10000, and 60000 for Node workers, whose event loop answers only between
    /// handlers (a long synchronous one delays every answer; Node's own primary never kills).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub ack_timeout: Option<u64>,

    /// TCP_DEFER_ACCEPT on every TCP listener the master holds (`--listen` ones too, but not
    /// a socket systemd passes by name, nor an `exclusive` listen a worker binds itself): a
    /// connection is accepted and handed to a worker only once its client has sent data,
    /// saving a wake-up of the master and of the worker per connection. For protocols where
    /// the client speaks first (HTTP; the built-in hello worker asks for it itself); never for
    /// ones where the server does (SMTP, SSH), whose clients would wait about a second.
    #[arg(long)]
    pub defer_accept: bool,

    /// Run the master's event loop as SCHED_BATCH throughout: a connection that arrives while
    /// every CPU is busy waits for one to free up instead of preempting a worker, and is
    /// dealt with the others that came meanwhile. Costly beside other CPU-bound processes,
    /// which the master then no longer preempts either: an accept may wait for a scheduler
    /// tick (4 ms at HZ=250). By default the loop is SCHED_BATCH only while every worker has
    /// at least 3 hand-offs unanswered (Node workers) and processes outside the cluster used
    /// at most 40 % of the CPU time. Workers start under the master's own policy
    /// (SCHED_OTHER); a master started under an idle or real-time one refuses this option.
    #[arg(long, conflicts_with = "sched_normal")]
    pub sched_batch: bool,

    /// Keep the master's event loop SCHED_OTHER throughout (see --sched-batch for the
    /// default).
    #[arg(long)]
    pub sched_normal: bool,

    /// Servers (listen calls) one worker may hold at once; a listen past it fails in the
    /// worker with EMFILE.
    #[arg(long, value_name = "N", default_value_t = cluster_master::DEFAULT_MAX_SERVERS_PER_WORKER,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_servers_per_worker: usize,

    /// An environment variable for every worker (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,

    /// Pre-bind ADDR in the master and pass it to every worker the systemd way (LISTEN_FDS,
    /// LISTEN_PID, LISTEN_FDNAMES; fds from 3), for programs that do not link cluster-worker.
    /// ADDR: tcp:HOST:PORT, HOST:PORT, udp:HOST:PORT or unix:PATH; or NAME, a socket the master
    /// inherited from systemd under that LISTEN_FDNAMES name (an inherited socket with the
    /// ADDR is used rather than bound, too). Repeatable; needs PROGRAM.
    #[arg(long = "listen", value_name = "ADDR|NAME", value_parser = parse_listen_arg, requires = "program")]
    pub listen: Vec<ListenArg>,

    /// The signal that stops a worker which does not speak the channel (a --listen program,
    /// any program): sent on stop, reload or scale-down, then SIGKILL after
    /// --shutdown-timeout. Exiting 0 or dying of this signal is a clean stop. A name (TERM,
    /// SIGINT, ...) or a number.
    #[arg(long, value_name = "SIGNAL", default_value = "TERM", value_parser = parse_signal)]
    pub stop_signal: i32,

    /// Address the built-in hello worker listens on.
    #[arg(long, default_value = "127.0.0.1", conflicts_with = "program")]
    pub host: IpAddr,

    /// Port the built-in hello worker listens on (default 8000; 0: any free port, shared by
    /// all workers). With a PROGRAM: set PORT=PORT in the workers' environment.
    #[arg(long)]
    pub port: Option<u16>,

    /// The worker program and its arguments (after `--`). Default: the built-in hello worker.
    #[arg(last = true, value_name = "PROGRAM [ARGS]")]
    pub program: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct HelloArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,

    /// Session threads; 0 runs sessions on the worker's loop thread (default: inline under a
    /// master or on 2 CPUs or fewer, else one per CPU).
    #[arg(long, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..))]
    pub threads: Option<usize>,
}

impl SpawnArgs {
    /// How the master's event loop is scheduled: `--sched-batch`, `--sched-normal`, or the
    /// library's default (batch while every worker is behind).
    pub fn loop_scheduling(&self) -> LoopScheduling {
        if self.sched_batch {
            LoopScheduling::Batch
        } else if self.sched_normal {
            LoopScheduling::Normal
        } else {
            LoopScheduling::default()
        }
    }

    /// The program, or `None` for the built-in hello worker.
    pub fn program(&self) -> Option<(PathBuf, &[OsString])> {
        let (first, rest) = self.program.split_first()?;
        Some((PathBuf::from(first), rest))
    }
}

/// The hello worker's port when `--port` is not given.
pub const DEFAULT_HELLO_PORT: u16 = 8000;

pub fn parse_signal(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n)
            .map(|sig| sig as i32)
            .map_err(|_| format!("`{s}` is not a signal number"));
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| format!("`{s}` is not a signal name"))
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub fn parse_workers(s: &str) -> Result<WorkerCount, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(WorkerCount::Auto);
    }
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (or `auto`)".into()),
        Ok(n) => Ok(WorkerCount::Fixed(n)),
        Err(_) => Err(format!("`{s}` is neither a number nor `auto`")),
    }
}

/// `--protocol`: fixed, or decided from the program once it is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolChoice {
    /// Node when the program is node (see the option's help), native otherwise.
    Auto,
    /// As given.
    Fixed(Protocol),
}

pub fn parse_protocol(s: &str) -> Result<ProtocolChoice, String> {
    match s {
        "auto" => Ok(ProtocolChoice::Auto),
        other => other.parse().map(ProtocolChoice::Fixed),
    }
}

pub fn parse_policy(s: &str) -> Result<Policy, String> {
    s.parse::<Policy>()
        .map_err(|_| format!("`{s}` is not one of rr, shared, reuseport"))
}

pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_owned(), v.to_owned()))
        }
        _ => Err(format!("`{s}` is not of the form KEY=VALUE")),
    }
}

/// A `--listen` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenArg {
    /// An address the master binds (unless it inherited a socket with it).
    Addr(ListenSpec),
    /// An inherited socket's `LISTEN_FDNAMES` name.
    Inherited(String),
}

pub fn parse_listen_arg(s: &str) -> Result<ListenArg, String> {
    // Names cannot hold `:` (LISTEN_FDNAMES separates them with it); every address form does.
    let is_name = !s.is_empty()
        && !s.contains(':')
        && !s.bytes().all(|b| b.is_ascii_digit())
        && s.bytes().all(|b| b.is_ascii_graphic());
    if is_name {
        return Ok(ListenArg::Inherited(s.to_owned()));
    }
    parse_listen(s).map(ListenArg::Addr)
}

pub fn parse_listen(s: &str) -> Result<ListenSpec, String> {
    fn inet(rest: &str, whole: &str) -> Result<SocketAddr, String> {
        // An IP literal only: resolving names here would pick one address family silently.
        rest.parse::<SocketAddr>().map_err(|_| {
            format!(
                "`{whole}`: expected HOST:PORT with an IP address (e.g. 127.0.0.1:8000, [::1]:8000)"
            )
        })
    }
    let addr = if let Some(rest) = s.strip_prefix("tcp:") {
        ListenAddr::Tcp(inet(rest, s)?)
    } else if let Some(rest) = s.strip_prefix("udp:") {
        ListenAddr::Udp(inet(rest, s)?)
    } else if let Some(rest) = s.strip_prefix("unix:") {
        if rest.is_empty() {
            return Err(format!("`{s}`: empty socket path"));
        }
        ListenAddr::Unix(PathBuf::from(rest))
    } else {
        ListenAddr::Tcp(inet(s, s)?)
    };
    Ok(ListenSpec::new(addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn workers_values() {
        assert_eq!(parse_workers("auto"), Ok(WorkerCount::Auto));
        assert_eq!(parse_workers("3"), Ok(WorkerCount::Fixed(3)));
        assert!(parse_workers("0").is_err());
        assert!(parse_workers("-1").is_err());
        assert!(parse_workers("many").is_err());
    }

    #[test]
    fn listen_forms() {
        let t = parse_listen("tcp:127.0.0.1:8000").unwrap();
        assert_eq!(t.addr, ListenAddr::Tcp("127.0.0.1:8000".parse().unwrap()));
        assert_eq!(parse_listen("127.0.0.1:8000").unwrap(), t);
        assert_eq!(
            parse_listen("[::1]:9").unwrap().addr,
            ListenAddr::Tcp("[::1]:9".parse().unwrap())
        );
        assert_eq!(
            parse_listen("udp:0.0.0.0:53").unwrap().addr,
            ListenAddr::Udp("0.0.0.0:53".parse().unwrap())
        );
        assert_eq!(
            parse_listen("unix:/tmp/x.sock").unwrap().addr,
            ListenAddr::Unix("/tmp/x.sock".into())
        );
        for bad in [
            "",
            "unix:",
            "tcp:localhost:80",
            "8000",
            "tcp:1.2.3.4",
            "udp:[::1]",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signal_values() {
        assert_eq!(parse_signal("TERM"), Ok(nix::libc::SIGTERM));
        assert_eq!(parse_signal("sigint"), Ok(nix::libc::SIGINT));
        assert_eq!(parse_signal("10"), Ok(10));
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("NOPE").is_err());
    }

    #[test]
    fn listen_names() {
        assert_eq!(
            parse_listen_arg("web"),
            Ok(ListenArg::Inherited("web".into()))
        );
        assert!(matches!(
            parse_listen_arg("127.0.0.1:1"),
            Ok(ListenArg::Addr(_))
        ));
        assert!(parse_listen_arg("8000").is_err());
        assert!(parse_listen_arg("").is_err());
    }

    #[test]
    fn env_values() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("A="), Ok(("A".into(), String::new())));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("noequals").is_err());
    }

    #[test]
    fn spawn_parses_program_and_rejects_misuse() {
        let cli =
            Cli::try_parse_from(["cluster-cli", "spawn", "-n", "2", "--", "prog", "--x"]).unwrap();
        let Command::Spawn(a) = cli.command else {
            panic!("not spawn")
        };
        assert_eq!(a.workers, WorkerCount::Fixed(2));
        let (p, rest) = a.program().unwrap();
        assert_eq!(p, PathBuf::from("prog"));
        assert_eq!(rest, [OsString::from("--x")]);
        // --listen makes no sense for the hello worker, which listens through the master.
        assert!(Cli::try_parse_from(["cluster-cli", "spawn", "--listen", "127.0.0.1:1"]).is_err());
        // --port with a program is its PORT variable; --host stays the hello worker's.
        assert!(Cli::try_parse_from(["cluster-cli", "spawn", "--port", "1", "--", "prog"]).is_ok());
        assert!(
            Cli::try_parse_from(["cluster-cli", "spawn", "--host", "::1", "--", "prog"]).is_err()
        );
        assert!(Cli::try_parse_from(["cluster-cli", "spawn", "--stop-signal", "BOGUS"]).is_err());
        assert!(Cli::try_parse_from(["cluster-cli", "spawn", "--policy", "fastest"]).is_err());
        assert!(Cli::try_parse_from(["cluster-cli", "spawn", "--window", "0"]).is_err());
        assert!(Cli::try_parse_from(["cluster-cli", "spawn", "--coalesce-min", "0"]).is_err());
        assert!(Cli::try_parse_from(["cluster-cli", "spawn", "--coalesce-us", "1001"]).is_err());
    }

    #[test]
    fn the_loop_is_batch_while_behind_unless_told_otherwise() {
        let scheduling = |args: &[&str]| {
            let argv = ["cluster-cli", "spawn"].iter().chain(args);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Command::Spawn(a)) => Ok(a.loop_scheduling()),
                Ok(_) => panic!("not spawn"),
                Err(e) => Err(e.kind()),
            }
        };
        assert_eq!(scheduling(&[]), Ok(LoopScheduling::default()));
        assert!(matches!(
            LoopScheduling::default(),
            LoopScheduling::BatchWhileBehind(_)
        ));
        assert_eq!(scheduling(&["--sched-batch"]), Ok(LoopScheduling::Batch));
        assert_eq!(scheduling(&["--sched-normal"]), Ok(LoopScheduling::Normal));
        assert_eq!(
            scheduling(&["--sched-batch", "--sched-normal"]),
            Err(clap::error::ErrorKind::ArgumentConflict)
        );
    }

    #[test]
    fn coalescing_is_on_by_default_and_zero_turns_it_off() {
        let spawn = |args: &[&str]| {
            let argv = ["cluster-cli", "spawn"].iter().chain(args);
            match Cli::try_parse_from(argv).unwrap().command {
                Command::Spawn(a) => (a.coalesce_us, a.coalesce_min),
                _ => panic!("not spawn"),
            }
        };
        let default = Coalesce::default();
        assert_eq!(spawn(&[]), (micros(default.delay), default.min_unanswered));
        assert_eq!(spawn(&["--coalesce-us", "0"]).0, 0);
        assert_eq!(spawn(&["--coalesce-min", "7"]).1, 7);
    }

    #[test]
    fn protocol_values() {
        assert_eq!(parse_protocol("auto"), Ok(ProtocolChoice::Auto));
        assert_eq!(
            parse_protocol("node"),
            Ok(ProtocolChoice::Fixed(Protocol::Node))
        );
        assert_eq!(
            parse_protocol("native"),
            Ok(ProtocolChoice::Fixed(Protocol::Native))
        );
        assert!(parse_protocol("deno").is_err());
        let cli = Cli::try_parse_from(["cluster-cli", "spawn", "--", "node", "app.js"]).unwrap();
        let Command::Spawn(a) = cli.command else {
            panic!("not spawn")
        };
        assert_eq!(a.protocol, ProtocolChoice::Auto);
    }
}
