//! An ETSI `Error` body for requests hyper refuses before they reach a router.
//!
//! hyper answers an HTTP/1 request head it cannot parse (a bad or duplicate
//! `Content-Length`, control bytes in a header, an unknown HTTP version, too many or too
//! large headers, a URI too long) on its own, with a bare `400`, `414` or `431` and no body,
//! and then closes the connection. Every answer of a dqkd server is JSON, so
//! [`JsonErrors`] sits between hyper and the TLS stream and replaces exactly those answers
//! with the same status, `Content-Type: application/json`, `Connection: close` and a body
//! `{"message": …}`. It recognises them by shape: a response head with one of those
//! statuses and `content-length: 0`. Routers never answer an error with an empty body, so
//! nothing else matches. Everything else passes through unchanged.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The statuses hyper sends on its own for an unparseable request head, with the message
/// each gets.
const AUTOMATIC: &[(&[u8], &str, &str)] = &[
    (b"HTTP/1.1 400 ", "400 Bad Request", "bad request format"),
    (
        b"HTTP/1.1 431 ",
        "431 Request Header Fields Too Large",
        "request header fields too large",
    ),
    (b"HTTP/1.1 414 ", "414 URI Too Long", "URI too long"),
];

/// A stream whose writes hyper's automatic error answers are replaced in.
pub(crate) struct JsonErrors<S> {
    inner: S,
    /// The rest of a replacement being written, and the length of the write it replaces.
    pending: Option<(Vec<u8>, usize)>,
}

impl<S> JsonErrors<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            pending: None,
        }
    }
}

/// The JSON answer that replaces `head`, if `head` is one of hyper's automatic answers.
fn replacement(head: &[u8]) -> Option<Vec<u8>> {
    let (_, status, message) = AUTOMATIC
        .iter()
        .find(|(prefix, _, _)| head.starts_with(prefix))?;
    let text = std::str::from_utf8(head).ok()?;
    let lower = text.to_ascii_lowercase();
    if !lower.ends_with("\r\n\r\n") || !lower.contains("\r\ncontent-length: 0\r\n") {
        return None;
    }
    let body = format!("{{\"message\":\"{message}\"}}");
    let mut answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    // Keep hyper's other headers (its Date) as they were.
    for line in text.split("\r\n").skip(1).filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
        if !matches!(
            name.as_str(),
            "content-length" | "content-type" | "connection"
        ) {
            answer.push_str(line);
            answer.push_str("\r\n");
        }
    }
    answer.push_str("\r\n");
    answer.push_str(&body);
    Some(answer.into_bytes())
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            match replacement(buf) {
                Some(answer) => this.pending = Some((answer, buf.len())),
                None => return Pin::new(&mut this.inner).poll_write(cx, buf),
            }
        }
        // Writes the replacement whole before reporting the original write done.
        while let Some((rest, replaced)) = this.pending.as_mut() {
            if rest.is_empty() {
                let replaced = *replaced;
                this.pending = None;
                return Poll::Ready(Ok(replaced));
            }
            let written = ready!(Pin::new(&mut this.inner).poll_write(cx, rest))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            rest.drain(..written);
        }
        Poll::Ready(Ok(0))
    }

    /// Vectored writes pass through as the stream does them; hyper writes an automatic
    /// answer as one buffer (it has no body), which goes the checked way.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (filled.next(), filled.next()) {
            return self.poll_write(cx, only);
        }
        if self.pending.is_some() {
            return Poll::Ready(Err(io::Error::other(
                "a write began while an error answer was being written",
            )));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::replacement;

    #[test]
    fn hyper_automatic_answers_get_a_json_body() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 00:00:00 GMT\r\n\r\n";
        let answer = String::from_utf8(replacement(head).expect("replaced")).expect("UTF-8");
        assert!(answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(answer.contains("\r\ncontent-type: application/json\r\n"));
        assert!(answer.contains("\r\nconnection: close\r\n"));
        assert!(answer.contains("\r\ndate: Tue, 01 Dec 2026 00:00:00 GMT\r\n"));
        assert!(answer.ends_with("\r\n\r\n{\"message\":\"request header fields too large\"}"));
        let body = "{\"message\":\"request header fields too large\"}";
        assert!(answer.contains(&format!("\r\ncontent-length: {}\r\n", body.len())));
    }

    #[test]
    fn answers_of_the_routers_pass_unchanged() {
        for head in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 30\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"\x00\x00\x12\x04\x00\x00\x00\x00\x00",
        ] {
            assert_eq!(replacement(head), None, "{head:?}");
        }
    }
}
