//! etcd client errors as one line an operator reads. The client's own `Display` of a gRPC
//! status shows its cause with `Debug` (`source: tonic::transport::Error(Transport,
//! ConnectError(...))`), and the client error does not expose its cause as `source()`.

use netd_common::report::{error_chain, with_causes};

/// What went wrong talking to etcd: the server's message (or the gRPC code's meaning when there
/// is none) followed by its causes, e.g. `tcp connect error: Connection refused (os error 111)`.
pub fn etcd_brief(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            // etcd's size errors come as "Error, decoded message length too large: ...".
            let message = s.message().trim_start_matches("Error, ");
            let head = if message.is_empty() { s.code().description().to_string() } else { message.to_string() };
            // tonic wraps connection failures in a bare "transport error": skip to its cause.
            let cause = match std::error::Error::source(s) {
                Some(c) if c.to_string() == "transport error" && c.source().is_some() => c.source(),
                c => c,
            };
            with_causes(head, cause)
        }
        etcd_client::Error::TransportError(t) => error_chain(t),
        etcd_client::Error::IoError(io) => error_chain(io),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn grpc_status_reads_as_its_message_and_causes() {
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        let mut s = tonic::Status::unavailable("tcp connect error");
        s.set_source(Arc::new(refused));
        let e = etcd_client::Error::GRpcStatus(s);
        assert!(e.to_string().contains("source: "), "the client's own text shows Debug: {e}");
        assert_eq!(etcd_brief(&e), "tcp connect error: Connection refused (os error 111)");
        let e = crate::registry::RegistryError::Etcd { op: "get --prefix /netd/registry/".into(), source: e };
        assert_eq!(e.to_string(), "etcd get --prefix /netd/registry/: tcp connect error: Connection refused (os error 111)");

        // How tonic reports a refused connection: Status -> "transport error" -> connect error -> errno.
        #[derive(Debug)]
        struct Wrap(&'static str, std::io::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.1)
            }
        }
        let mut s = tonic::Status::unavailable("tcp connect error");
        s.set_source(Arc::new(Wrap("transport error", std::io::Error::from_raw_os_error(libc::ECONNREFUSED))));
        assert_eq!(etcd_brief(&etcd_client::Error::GRpcStatus(s)), "tcp connect error: Connection refused (os error 111)");

        let e: etcd_client::Error = tonic::Status::out_of_range("Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes").into();
        assert_eq!(etcd_brief(&e), "decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes");

        let e = etcd_client::Error::GRpcStatus(tonic::Status::not_found("etcdserver: requested lease not found"));
        assert_eq!(etcd_brief(&e), "etcdserver: requested lease not found");
        let e = etcd_client::Error::GRpcStatus(tonic::Status::new(tonic::Code::DeadlineExceeded, ""));
        assert_eq!(etcd_brief(&e), "Deadline expired before operation could complete");
        let e = etcd_client::Error::WatchError("canceled".into());
        assert_eq!(etcd_brief(&e), "watch error: canceled");
    }
}
