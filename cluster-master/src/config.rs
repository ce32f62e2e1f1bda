use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster_core::{ListenSpec, Policy};

use crate::round_robin::RoundRobinConfig;
use crate::supervisor::RestartPolicy;
use crate::{Master, MasterError};

/// Servers one worker may hold unless [`MasterBuilder::max_servers_per_worker`] says otherwise.
pub const DEFAULT_MAX_SERVERS_PER_WORKER: usize = 32;

/// Configures and starts a [`Master`].
///
/// ```no_run
/// use cluster_master::MasterBuilder;
/// let master = MasterBuilder::new("./my-worker").workers(4).start()?;
/// master.shutdown()?;
/// master.wait()?;
/// # Ok::<(), cluster_master::MasterError>(())
/// ```
#[derive(Clone, Debug)]
pub struct MasterBuilder {
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) workers: usize,
    pub(crate) policy: Policy,
    pub(crate) round_robin: RoundRobinConfig,
    pub(crate) restart: RestartPolicy,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) ack_timeout: Duration,
    pub(crate) ready_timeout: Duration,
    pub(crate) capture_output: bool,
    pub(crate) max_frame: usize,
    pub(crate) listen_fds: Vec<(String, ListenSpec)>,
    pub(crate) max_servers_per_worker: usize,
    pub(crate) protocol: crate::Protocol,
}

impl MasterBuilder {
    /// A master that runs `program` as its workers.
    pub fn new(program: impl AsRef<Path>) -> Self {
        Self {
            program: program.as_ref().to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
            workers: 1,
            policy: Policy::RoundRobin,
            round_robin: RoundRobinConfig::default(),
            restart: RestartPolicy::default(),
            shutdown_timeout: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(10),
            ready_timeout: Duration::from_secs(30),
            capture_output: false,
            max_frame: cluster_ipc::frame::DEFAULT_MAX_FRAME,
            listen_fds: Vec::new(),
            max_servers_per_worker: DEFAULT_MAX_SERVERS_PER_WORKER,
            protocol: crate::Protocol::Native,
        }
    }

    /// Appends an argument for the worker program.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends arguments for the worker program.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for every worker (on top of the master's environment).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// How many workers (slots) to run. At least one.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// The IPC protocol the workers speak: [`crate::Protocol::Node`] runs unmodified Node.js
    /// programs (`node app.js`) as workers. Default: native.
    pub fn protocol(mut self, protocol: crate::Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// How listening sockets are shared.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Round-robin tuning: credit window, queue bound, retries, queue timeout.
    pub fn round_robin(mut self, config: RoundRobinConfig) -> Self {
        self.round_robin = config;
        self
    }

    /// Hand-offs in flight per worker (1 is Node's rule).
    pub fn window(mut self, window: usize) -> Self {
        self.round_robin.window = window.max(1);
        self
    }

    /// Restart and give-up rules for crashed workers.
    pub fn restart_policy(mut self, policy: RestartPolicy) -> Self {
        self.restart = policy;
        self
    }

    /// How long a disconnecting worker may take to finish before it is killed.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// How long a worker may leave a hand-off unanswered before it is considered stuck and
    /// killed (its connections go to the others). Each hand-off has its own deadline: answering
    /// others does not extend it. Default 10 s.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// How long a new worker in a rolling reload may take to reach `listening`.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Capture each worker's stdout and stderr and deliver them line by line as
    /// [`crate::Event::Output`] instead of letting workers inherit the master's.
    pub fn capture_output(mut self, capture: bool) -> Self {
        self.capture_output = capture;
        self
    }

    /// The cap on a frame from a worker.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// How many servers one worker may hold at once (default 32). A `listen` past it fails in
    /// the worker with `EMFILE`, so a worker cannot make the master open sockets without
    /// bound.
    pub fn max_servers_per_worker(mut self, n: usize) -> Self {
        self.max_servers_per_worker = n.max(1);
        self
    }

    /// Pre-binds `spec` in the master and passes it to every worker the systemd way
    /// (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`, fds from 3), for programs that do not
    /// speak the cluster protocol. Such workers count as listening once spawned.
    pub fn listen_fd(mut self, name: impl Into<String>, spec: ListenSpec) -> Self {
        self.listen_fds.push((name.into(), spec));
        self
    }

    /// Binds the pre-bound sockets, spawns the workers and starts the event loop thread.
    pub fn start(self) -> Result<Master, MasterError> {
        Master::start(self)
    }
}
