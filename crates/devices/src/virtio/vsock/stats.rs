//! vsock counters, named after Firecracker's vsock metrics where one
//! fits (`rx` is towards the guest, `tx` from it).

/// Counters, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockStats {
    /// Receive-queue notifications.
    pub rx_queue_event_count: u64,
    /// Transmit-queue notifications.
    pub tx_queue_event_count: u64,
    /// Packets given to the guest.
    pub rx_packets_count: u64,
    /// Payload bytes given to the guest.
    pub rx_bytes_count: u64,
    /// Packets the guest sent (well-formed or not).
    pub tx_packets_count: u64,
    /// Payload bytes the guest sent on live connections.
    pub tx_bytes_count: u64,
    /// Guest bytes a host socket did not take at once (held, then written).
    pub tx_buffered_bytes: u64,
    /// Held bytes written later.
    pub tx_flushed_bytes: u64,
    /// Connections made.
    pub conns_added: u64,
    /// Connections ended with an RST to the guest.
    pub conns_killed: u64,
    /// Connections ended, any way.
    pub conns_removed: u64,
    /// Connections refused: the limit, or no listener at `<uds_path>_<port>`.
    pub conns_refused: u64,
    /// Host connections or guest answers that did not come in time.
    pub connect_timeouts: u64,
    /// `CONNECT` lines that were not one.
    pub bad_connect_lines: u64,
    /// Writes of held bytes to a host socket that failed.
    pub tx_flush_fails: u64,
    /// Guest data that could not go to a host socket (the connection is reset).
    pub tx_write_fails: u64,
    /// Reads from a host socket that failed.
    pub rx_read_fails: u64,
    /// Listener failures.
    pub muxer_event_fails: u64,
    /// epoll changes for a connection that failed.
    pub conn_event_fails: u64,
    /// Malformed packets (bad header, length, CID, type, operation).
    pub bad_packets: u64,
    /// Malformed chains on either queue (loops, indirect descriptors,
    /// wrong direction, outside guest memory).
    pub invalid_chains: u64,
    /// Notifications with an available index the queue cannot hold.
    pub invalid_avail_idx: u64,
    /// Resets for the guest dropped because too many were waiting.
    pub ctrl_dropped: u64,
}

impl VsockStats {
    /// The counters by name, for metrics.
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("rx_queue_event_count", self.rx_queue_event_count),
            ("tx_queue_event_count", self.tx_queue_event_count),
            ("rx_packets_count", self.rx_packets_count),
            ("rx_bytes_count", self.rx_bytes_count),
            ("tx_packets_count", self.tx_packets_count),
            ("tx_bytes_count", self.tx_bytes_count),
            ("tx_buffered_bytes", self.tx_buffered_bytes),
            ("tx_flushed_bytes", self.tx_flushed_bytes),
            ("conns_added", self.conns_added),
            ("conns_killed", self.conns_killed),
            ("conns_removed", self.conns_removed),
            ("conns_refused", self.conns_refused),
            ("connect_timeouts", self.connect_timeouts),
            ("bad_connect_lines", self.bad_connect_lines),
            ("tx_flush_fails", self.tx_flush_fails),
            ("tx_write_fails", self.tx_write_fails),
            ("rx_read_fails", self.rx_read_fails),
            ("muxer_event_fails", self.muxer_event_fails),
            ("conn_event_fails", self.conn_event_fails),
            ("bad_packets_count", self.bad_packets),
            ("invalid_chains_count", self.invalid_chains),
            ("invalid_avail_idx_count", self.invalid_avail_idx),
            ("ctrl_dropped", self.ctrl_dropped),
        ]
    }
}
