//! A sandbox's DNS responder (SPEC 5.2), on UDP and TCP port 53: every query CMD sends
//! reaches it, and nothing it asks is forwarded. Every A query gets the name's own address
//! of the sandbox ([`super::names`]), so that a connection to it, on any port, reaches moat
//! with the name known; moat decides on the name and resolves it itself only when it dials.
//! With internet on, a name that may egress is first looked up with moat's own resolver
//! (`[dns] hosts` / `--resolve` first) so that a name that does not exist is NXDOMAIN, as
//! outside. AAAA and every other type get no records (the sandbox has no IPv6 route). Each
//! query is logged with the container.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use super::names::SandboxNames;
use super::state::{ClassId, Shared};
use crate::identity::ContainerId;
use crate::policy::decide::effective_internet;
use crate::policy::{CanonicalHost, Decision, decide};
use crate::upstream::resolve::Resolver;

/// How long an answer may be cached: short, so that a policy change is seen soon.
const TTL: u32 = 5;
/// A TCP client that sends nothing for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// One sandbox's DNS: whose queries they are, the class that decides them, its names.
pub struct Responder {
    shared: Arc<Shared>,
    class: ClassId,
    container: ContainerId,
    names: Arc<SandboxNames>,
    resolver: Resolver,
}

/// What a query is answered with.
#[derive(Debug, PartialEq)]
enum Answer {
    Address(Ipv4Addr),
    NoRecords,
    NoSuchName,
    /// The sandbox has asked for more names than it may have.
    Refused,
}

impl Responder {
    pub fn new(shared: Arc<Shared>, class: ClassId, container: ContainerId, names: Arc<SandboxNames>) -> Self {
        let resolver = Resolver::new(shared.dns_hosts.clone());
        Self { shared, class, container, names, resolver }
    }

    /// Answers the queries arriving on `socket`, for ever.
    pub async fn serve_udp(self: Arc<Self>, socket: UdpSocket) {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else { continue };
            if let Some(answer) = self.answer(&buf[..n]).await {
                let _ = socket.send_to(&answer, peer).await;
            }
        }
    }

    /// Answers DNS over TCP (RFC 7766: each message after its two-byte length), for ever.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let me = self.clone();
            tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 2];
                    match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
                        Ok(Ok(_)) => {}
                        _ => return,
                    }
                    let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
                    if stream.read_exact(&mut query).await.is_err() {
                        return;
                    }
                    let Some(answer) = me.answer(&query).await else { return };
                    let Ok(len) = u16::try_from(answer.len()) else { return };
                    if stream.write_all(&len.to_be_bytes()).await.is_err() || stream.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    /// The answer to one query message, or None for what is not a query (dropped, as a
    /// server drops garbage).
    async fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let (request, question) = match parse(query)? {
            Ok(parsed) => parsed,
            Err(refusal) => return Some(refusal),
        };
        let kind = question.query_type();
        let name = question.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
        let answer = if kind != RecordType::A {
            Answer::NoRecords
        } else if self.may_not_exist(&name).await {
            Answer::NoSuchName
        } else {
            self.names.address(&name).map_or(Answer::Refused, Answer::Address)
        };
        let shown = match &answer {
            Answer::Address(ip) => ip.to_string(),
            Answer::NoRecords => "no records".into(),
            Answer::NoSuchName => "no such name".into(),
            Answer::Refused => format!("refused: the sandbox has asked for {} names already", super::names::CAPACITY),
        };
        tracing::info!(target: "moat::dns", container = %self.container, "dns {kind} {name}.: {shown}");
        Some(respond(&request, question, answer))
    }

    /// With internet on and a name that would egress, whether moat's resolver says it does
    /// not exist. Nothing is looked up for a name the policy denies or a handler answers.
    async fn may_not_exist(&self, name: &str) -> bool {
        let Some(generation) = self.shared.class(self.class).current() else { return false };
        let Ok(host) = CanonicalHost::parse(name) else { return false };
        let overrides = self.shared.overrides.get(self.container.as_str(), &generation);
        let (policy, inst) = (&generation.policy, overrides.as_deref());
        if !effective_internet(policy, inst) || decide(&host, 443, policy, inst).decision != Decision::Egress {
            return false;
        }
        self.resolver.name_exists(name).await == Some(false)
    }
}

/// The query in `bytes`: `Ok` with its one question, `Err` with the answer to a query this
/// responder does not serve (NotImp), `None` for what is not a query at all.
fn parse(bytes: &[u8]) -> Option<Result<(Message, Query), Vec<u8>>> {
    let request = Message::from_vec(bytes).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    if request.metadata.op_code != OpCode::Query || request.queries.len() != 1 {
        let mut response = reply_to(&request);
        response.metadata.response_code = ResponseCode::NotImp;
        return Some(Err(response.to_vec().ok()?));
    }
    let question = request.queries[0].clone();
    Some(Ok((request, question)))
}

fn reply_to(request: &Message) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response
}

/// The response message to `question` of `request`.
fn respond(request: &Message, question: Query, answer: Answer) -> Vec<u8> {
    let mut response = reply_to(request);
    match answer {
        Answer::Address(ip) => {
            response.add_answer(Record::from_rdata(question.name().clone(), TTL, RData::A(A(ip))));
        }
        Answer::NoRecords => {}
        Answer::NoSuchName => response.metadata.response_code = ResponseCode::NXDomain,
        Answer::Refused => response.metadata.response_code = ResponseCode::Refused,
    }
    response.add_query(question);
    response.to_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use hickory_proto::rr::Name;

    use super::*;

    fn ask(name: &str, kind: RecordType, answer: Answer) -> Message {
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        q.metadata.recursion_desired = true;
        let (request, question) = parse(&q.to_vec().unwrap()).unwrap().unwrap();
        let r = Message::from_vec(&respond(&request, question, answer)).unwrap();
        assert_eq!(r.metadata.id, q.metadata.id);
        assert_eq!(r.queries, q.queries);
        assert!(r.metadata.recursion_desired && r.metadata.recursion_available);
        r
    }

    #[test]
    fn answers_carry_the_question_and_only_what_was_decided() {
        let ip = Ipv4Addr::new(198, 18, 0, 7);
        let r = ask("api.github.com.", RecordType::A, Answer::Address(ip));
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].data, RData::A(A(ip)));
        assert!(ask("api.github.com.", RecordType::AAAA, Answer::NoRecords).answers.is_empty());
        assert_eq!(ask("x.test.", RecordType::A, Answer::NoSuchName).metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(ask("x.test.", RecordType::TXT, Answer::NoRecords).metadata.response_code, ResponseCode::NoError);
        assert!(parse(b"not dns").is_none());
        let mut update = Message::query();
        update.metadata.op_code = OpCode::Update;
        update.add_query(Query::query(Name::from_ascii("x.test.").unwrap(), RecordType::A));
        let refused = Message::from_vec(&parse(&update.to_vec().unwrap()).unwrap().unwrap_err()).unwrap();
        assert_eq!(refused.metadata.response_code, ResponseCode::NotImp);
    }
}
