//! Benchmark upstream: a small, fast HTTP server on loopback answering every request with a
//! fixed 13-byte body. Multi-threaded so that it is never the bottleneck.
//!
//! bench-upstream ADDR [TLS_ADDR CA_PEM_OUT]
//!
//! With TLS_ADDR it also serves HTTPS there (ALPN h2 and http/1.1) with a certificate for
//! 127.0.0.1 signed by a CA made at start, whose certificate it writes to CA_PEM_OUT.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = args.first().cloned().unwrap_or_else(|| "127.0.0.1:18080".into());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async move {
        if let (Some(tls_addr), Some(ca_out)) = (args.get(1), args.get(2)) {
            let acceptor = tls_acceptor(ca_out);
            let listener = tokio::net::TcpListener::bind(tls_addr).await.unwrap();
            println!("upstream listening on https://{}", listener.local_addr().unwrap());
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    let _ = stream.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(stream).await else { return };
                        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(tls), service_fn(answer))
                                .await;
                        } else {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), service_fn(answer))
                                .await;
                        }
                    });
                }
            });
        }
        let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
        println!("upstream listening on {}", listener.local_addr().unwrap());
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(answer))
                    .await;
            });
        }
    });
}

async fn answer<B>(_req: hyper::Request<B>) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    Ok(hyper::Response::new(Full::new(Bytes::from_static(b"hello, moat!\n"))))
}

/// A CA (certificate written to `ca_out`) and a leaf for 127.0.0.1 that it signs.
fn tls_acceptor(ca_out: &str) -> tokio_rustls::TlsAcceptor {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "moat bench CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
    std::fs::write(ca_out, ca.pem()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &ca).unwrap();
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}
