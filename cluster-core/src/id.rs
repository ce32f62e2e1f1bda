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
