//! Helpers for the operation tests: scraping `/metrics`, and calls held
//! in flight by a request body sent in two parts.

#![allow(dead_code, clippy::unwrap_used)]

use super::TestServer;

/// The value of the series `name{labels}` exactly as rendered, 0 when absent.
pub fn series(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name_and_labels)?;
            rest.strip_prefix(' ')?.trim().parse::<f64>().ok()
        })
        .unwrap_or(0.0)
}

pub async fn scrape(t: &TestServer) -> Result<String, reqwest::Error> {
    t.http.get(t.rest("/metrics")).send().await?.text().await
}

/// A request whose body has not all been sent: the server is answering it
/// (its handler waits for the rest) until `finish` sends the last byte.
pub struct HeldCall {
    pub rest: tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
    pub response: tokio::task::JoinHandle<Result<reqwest::Response, reqwest::Error>>,
    last: Vec<u8>,
}

impl HeldCall {
    /// Sends everything but the last byte of `body` to `url`.
    pub async fn start(
        client: &reqwest::Client,
        url: String,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let split = body.len() - 1;
        tx.send(Ok(body[..split].to_vec()))
            .await
            .expect("first part");
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut request = client.post(url).body(reqwest::Body::wrap_stream(stream));
        for (k, v) in headers {
            request = request.header(*k, v);
        }
        let response = tokio::spawn(request.send());
        Self {
            rest: tx,
            response,
            last: body[split..].to_vec(),
        }
    }

    /// `POST /admin/credits/manual` with `body`, held in flight.
    pub async fn manual_adjust(t: &TestServer, admin_token: &str, body: &[u8]) -> Self {
        Self::start(
            &t.http,
            t.rest("/admin/credits/manual"),
            &[
                ("content-type", "application/json".into()),
                ("authorization", format!("Bearer {admin_token}")),
            ],
            body.to_vec(),
        )
        .await
    }

    pub async fn finish(self) -> reqwest::Response {
        self.rest.send(Ok(self.last)).await.expect("last part");
        drop(self.rest);
        self.response.await.expect("task").expect("response")
    }
}
