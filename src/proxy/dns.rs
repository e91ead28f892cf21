//! A sandbox's DNS responder (SPEC 5.2): every query CMD sends reaches it, and nothing it
//! asks leaves the machine. Without internet every A query is answered with [`INTERNAL`], so
//! that HTTP(S) to any name reaches moat, which then decides on the name with a clear answer
//! (a 520 when denied); AAAA and every other type get no records. Each query is logged with
//! the container.

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

use crate::identity::ContainerId;

/// The address every name has inside a sandbox without internet: with every address local
/// there, any would do; this one is from the benchmarking range (RFC 2544), never a host's.
pub const INTERNAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// How long an answer may be cached: short, so that a policy change is seen soon.
const TTL: u32 = 5;

/// Answers the queries arriving on `socket` for `container`, for ever.
pub async fn serve(socket: UdpSocket, container: ContainerId) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else { continue };
        if let Some(answer) = answer(&buf[..n], &container) {
            let _ = socket.send_to(&answer, peer).await;
        }
    }
}

/// The answer to one query message, or None for what is not a query (dropped, as a server
/// drops garbage).
pub fn answer(query: &[u8], container: &ContainerId) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    if request.metadata.op_code != OpCode::Query || request.queries.len() != 1 {
        response.metadata.response_code = ResponseCode::NotImp;
        return response.to_vec().ok();
    }
    let question = request.queries[0].clone();
    let name = question.name().clone();
    let kind = question.query_type();
    let given = if kind == RecordType::A {
        response.add_answer(Record::from_rdata(name.clone(), TTL, RData::A(A(INTERNAL))));
        INTERNAL.to_string()
    } else {
        "no records".to_string()
    };
    tracing::info!(target: "moat::dns", container = %container, "dns {kind} {name}: {given}");
    response.add_query(question);
    response.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    use super::*;

    fn ask(name: &str, kind: RecordType) -> Message {
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        q.metadata.recursion_desired = true;
        let id = crate::identity::ContainerId::parse("agent-1").unwrap();
        let bytes = answer(&q.to_vec().unwrap(), &id).unwrap();
        let r = Message::from_vec(&bytes).unwrap();
        assert_eq!(r.metadata.id, q.metadata.id);
        assert_eq!(r.queries, q.queries);
        r
    }

    #[test]
    fn every_a_query_gets_the_internal_address_and_nothing_else_gets_records() {
        let r = ask("api.github.com.", RecordType::A);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].data, RData::A(A(INTERNAL)));
        assert!(ask("api.github.com.", RecordType::AAAA).answers.is_empty());
        assert!(ask("example.com.", RecordType::MX).answers.is_empty());
        assert_eq!(ask("x.test.", RecordType::TXT).metadata.response_code, ResponseCode::NoError);
        assert!(answer(b"not dns", &crate::identity::ContainerId::parse("a").unwrap()).is_none());
    }
}
