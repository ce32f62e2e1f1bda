use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// A worker's id: 1 for the first worker forked, never reused within one master (as Node).
    WorkerId(u32)
);
id_type!(
    /// One accepted connection in flight from the master to a worker, unique within a master.
    ConnId(u64)
);
id_type!(
    /// Correlates a request (`QueryServer`) with its reply, unique per channel direction.
    Seq(u64)
);
id_type!(
    /// The master's short name for one shared server (one [`crate::ListenKey`]); hand-off frames
    /// carry it instead of the whole key.
    ServerId(u32)
);

impl ConnId {
    /// Bits of a connection id left for the per-server counter; the server id sits above them,
    /// so a worker's bare `Accepted { conn }` still names the server it belongs to.
    pub const COUNTER_BITS: u32 = 40;

    /// The `n`-th connection of `server` (n wraps within [`ConnId::COUNTER_BITS`]).
    pub fn new(server: ServerId, n: u64) -> ConnId {
        ConnId((u64::from(server.0) << Self::COUNTER_BITS) | (n & ((1 << Self::COUNTER_BITS) - 1)))
    }

    /// The server this connection was accepted on.
    pub fn server(self) -> ServerId {
        ServerId((self.0 >> Self::COUNTER_BITS) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_id_names_its_server() {
        let c = ConnId::new(ServerId(77), 12345);
        assert_eq!(c.server(), ServerId(77));
        assert_ne!(c, ConnId::new(ServerId(78), 12345));
        assert_eq!(
            ConnId::new(ServerId(1), 1 << 40),
            ConnId::new(ServerId(1), 0)
        );
    }
}
