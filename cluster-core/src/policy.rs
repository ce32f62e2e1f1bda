use std::fmt;
use std::str::FromStr;

/// How the master shares a listening socket among its workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Policy {
    /// Node's `SCHED_RR`: the master accepts and hands each connection to one worker.
    #[default]
    RoundRobin,
    /// Node's `SCHED_NONE`: every worker accepts on the master's one bound socket.
    Shared,
    /// One `SO_REUSEPORT` socket per worker slot, kept by the master across restarts of that
    /// slot so its accept queue survives a crash.
    ReusePort,
}

impl Policy {
    /// The policy actually used for a listen: datagram sockets cannot be handed off one
    /// connection at a time, so UDP is always shared (as in Node).
    pub fn effective(self, is_udp: bool) -> Policy {
        if is_udp && self == Policy::RoundRobin {
            Policy::Shared
        } else {
            self
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::RoundRobin => "rr",
            Policy::Shared => "shared",
            Policy::ReusePort => "reuseport",
        })
    }
}

impl FromStr for Policy {
    type Err = crate::CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rr" | "round-robin" => Ok(Policy::RoundRobin),
            "shared" | "none" => Ok(Policy::Shared),
            "reuseport" | "reuse-port" => Ok(Policy::ReusePort),
            other => Err(crate::CoreError::UnknownPolicy(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_never_round_robin() {
        assert_eq!(Policy::RoundRobin.effective(true), Policy::Shared);
        assert_eq!(Policy::ReusePort.effective(true), Policy::ReusePort);
        assert_eq!(Policy::RoundRobin.effective(false), Policy::RoundRobin);
    }

    #[test]
    fn parses_names_and_rejects_others() {
        for p in [Policy::RoundRobin, Policy::Shared, Policy::ReusePort] {
            assert_eq!(p.to_string().parse::<Policy>().ok(), Some(p));
        }
        assert!("fastest".parse::<Policy>().is_err());
    }
}
