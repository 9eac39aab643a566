//! Record generation and wire encoding, checked end to end: a query is built with hickory,
//! answered by the real request path ([`crate::answer::handle`]) and the response parsed back
//! with hickory.

use std::net::IpAddr;
use std::time::Instant;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::*;
use crate::acl::Acl;
use crate::answer::{handle, Ctx, ForwardKind, Outcome, Transport, MAX_MESSAGE};
use crate::cache::{cache_key, entry_from_response, Cache, CachePolicy, CACHE_KEY_MAX};
use crate::fixtures::{self, sample_config, sample_zone};
use crate::metrics::Counters;

const POD: [u8; 4] = [10, 244, 1, 2];
const FOREIGN: [u8; 4] = [198, 51, 100, 7];

struct Env {
    zone: std::sync::Arc<Zone>,
    sky: crate::skydns::SkyZone,
    hosts: crate::hosts::Hosts,
    cache: Cache,
    acl: Acl,
    counters: Counters,
}

impl Env {
    fn new(zone: Zone) -> Env {
        Env::shared(std::sync::Arc::new(zone))
    }

    fn shared(zone: std::sync::Arc<Zone>) -> Env {
        Env { zone, sky: crate::skydns::SkyZone::default(), hosts: crate::hosts::Hosts::default(), cache: Cache::new(100), acl: Acl::new(vec!["10.244.0.0/16".parse().unwrap()]), counters: Counters::default() }
    }

    fn raw(&self, packet: &[u8], client: [u8; 4], t: Transport, rotation: u32) -> (Outcome, Vec<u8>) {
        let ctx = Ctx {
            zone: &self.zone,
            sky: &self.sky,
            hosts: &self.hosts,
            cache: &self.cache,
            acl: &self.acl,
            counters: &self.counters,
            udp_cap: 1232,
            rotation,
        };
        let mut out = vec![0u8; MAX_MESSAGE];
        let o = handle(&ctx, packet, IpAddr::from(client), t, &mut out);
        if let Outcome::Reply(n) = o {
            out.truncate(n);
        }
        (o, out)
    }

    /// Sends `q`; panics unless the server replies.
    fn reply(&self, packet: &[u8], client: [u8; 4], t: Transport) -> (Message, Vec<u8>) {
        match self.raw(packet, client, t, 0) {
            (Outcome::Reply(_), bytes) => (Message::from_vec(&bytes).expect("response parses"), bytes),
            (o, _) => panic!("expected a reply, got {o:?}"),
        }
    }

    fn ask(&self, name: &str, t: RecordType) -> Message {
        self.reply(&query(name, t, Some(1232)), POD, Transport::Udp).0
    }
}

/// The sample zone, built once (building it is slow in debug builds).
fn env() -> Env {
    static ZONE: std::sync::OnceLock<std::sync::Arc<Zone>> = std::sync::OnceLock::new();
    Env::shared(ZONE.get_or_init(|| std::sync::Arc::new(sample_zone())).clone())
}

fn query(name: &str, t: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(0xbeef).set_message_type(MessageType::Query).set_op_code(OpCode::Query).set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn addrs(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn srvs(records: &[Record]) -> Vec<(u16, u16, u16, String)> {
    let mut v: Vec<_> = records
        .iter()
        .filter_map(|r| match r.data() {
            RData::SRV(s) => Some((s.priority(), s.weight(), s.port(), s.target().to_string())),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn assert_negative(m: &Message, rc: ResponseCode) {
    assert_eq!(m.response_code(), rc);
    assert!(m.authoritative());
    assert!(m.answers().is_empty(), "{:?}", m.answers());
    assert_eq!(m.name_servers().len(), 1);
    let soa = &m.name_servers()[0];
    assert_eq!(soa.name().to_string(), "cluster.local.");
    assert_eq!(soa.ttl(), 5);
    let RData::SOA(s) = soa.data() else { panic!("not an SOA: {soa:?}") };
    assert_eq!(s.mname().to_string(), "ns.dns.cluster.local.");
    assert_eq!(s.rname().to_string(), "hostmaster.cluster.local.");
    assert_eq!((s.serial(), s.minimum()), (1, 5));
}

#[test]
fn cluster_ip_service_has_an_a_record() {
    let m = env().ask("web.default.svc.cluster.local.", RecordType::A);
    assert_eq!(m.id(), 0xbeef);
    assert_eq!(m.message_type(), MessageType::Response);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.authoritative() && m.recursion_desired() && m.recursion_available());
    assert_eq!(addrs(&m), ["10.96.0.20"]);
    assert_eq!(m.answers()[0].ttl(), 30);
    assert_eq!(m.answers()[0].dns_class(), DNSClass::IN);
    assert_eq!(m.queries()[0].name().to_string(), "web.default.svc.cluster.local.");
}

#[test]
fn names_are_case_insensitive_and_the_question_case_is_kept() {
    let e = env();
    let (m, raw) = e.reply(&query("WeB.DeFault.SVC.Cluster.LOCAL.", RecordType::A, None), POD, Transport::Udp);
    assert_eq!(addrs(&m), ["10.96.0.20"]);
    assert_eq!(m.queries()[0].name().to_ascii(), "WeB.DeFault.SVC.Cluster.LOCAL.");
    assert!(raw.windows(3).any(|w| w == b"WeB"));
    // The answer's owner name points at the question, so it carries the client's case too
    // (what 0x20-randomizing resolvers check).
    assert_eq!(m.answers()[0].name().to_ascii(), "WeB.DeFault.SVC.Cluster.LOCAL.");
    let m = e.ask("DB-0.db.DEFAULT.svc.cluster.local.", RecordType::A);
    assert_eq!(addrs(&m), ["10.244.1.21"]);
}

#[test]
fn other_types_of_an_existing_name_are_nodata_with_the_soa() {
    let e = env();
    for t in [RecordType::AAAA, RecordType::TXT, RecordType::MX, RecordType::CNAME, RecordType::PTR] {
        assert_negative(&e.ask("web.default.svc.cluster.local.", t), ResponseCode::NoError);
    }
    // Empty non-terminals exist too.
    for n in ["svc.cluster.local.", "pod.cluster.local.", "default.svc.cluster.local.", "kube-system.svc.cluster.local."] {
        assert_negative(&e.ask(n, RecordType::A), ResponseCode::NoError);
    }
}

#[test]
fn missing_names_are_nxdomain_with_the_soa() {
    let e = env();
    for n in [
        "nope.default.svc.cluster.local.",
        "web.nons.svc.cluster.local.",
        "nons.svc.cluster.local.",
        "foo.cluster.local.",
        "web.default.cluster.local.",
        "x.y.web.default.svc.cluster.local.",
        "a.b.c.web.default.svc.cluster.local.",
        "_http._udp.web.default.svc.cluster.local.",
        "_nope._tcp.web.default.svc.cluster.local.",
        "example.com.default.svc.cluster.local.",
        "empty.default.svc.cluster.local.",
        "db-2.db.default.svc.cluster.local.",
        "10-244-3-7.web.default.svc.cluster.local.",
    ] {
        let m = e.ask(n, RecordType::A);
        assert_negative(&m, ResponseCode::NXDomain);
        let m = e.ask(n, RecordType::SRV);
        assert_negative(&m, ResponseCode::NXDomain);
    }
}

/// `<ns>.svc.<zone>` exists (NODATA) exactly when the namespace has an object netd knows: a
/// Service, or an EndpointSlice (e.g. one managed by hand, without a Service, or a Service that
/// is not valid DNS). Names of services that do not exist are NXDOMAIN either way (as in CoreDNS).
#[test]
fn namespaces_exist_when_they_have_services_or_endpointslices() {
    let svcs = vec![std::sync::Arc::new(fixtures::cluster_ip("apps", "web", &["10.96.0.50"], &[("http", "TCP", 80)]))];
    let orphan = fixtures::slice("batch", "gone", "gone-1", &[(&["10.244.7.7"], None, true)], &[("http", "TCP", 80)]);
    let mut unlabelled = fixtures::slice("tools", "x", "x-1", &[(&["10.244.7.8"], None, true)], &[]);
    unlabelled.metadata.labels = None;
    let mut slices = vec![std::sync::Arc::new(orphan), std::sync::Arc::new(unlabelled)];
    let mut b = ZoneBuilder::new(sample_config());
    let e = Env::shared(b.update(&svcs, &slices));
    for ns in ["apps", "batch", "tools", "APPS"] {
        assert_negative(&e.ask(&format!("{ns}.svc.cluster.local."), RecordType::A), ResponseCode::NoError);
    }
    for n in [
        "nons.svc.cluster.local.",
        "web.nons.svc.cluster.local.",
        "nosuch.apps.svc.cluster.local.",
        "gone.batch.svc.cluster.local.",
        "x.tools.svc.cluster.local.",
        "_http._tcp.nosuch.apps.svc.cluster.local.",
    ] {
        assert_negative(&e.ask(n, RecordType::A), ResponseCode::NXDomain);
    }
    assert_eq!(addrs(&e.ask("web.apps.svc.cluster.local.", RecordType::A)), ["10.96.0.50"]);
    // The namespace's last object goes: so does the namespace (incrementally, too).
    slices.remove(0);
    let e = Env::shared(b.update(&svcs, &slices));
    assert_negative(&e.ask("batch.svc.cluster.local.", RecordType::A), ResponseCode::NXDomain);
    assert_negative(&e.ask("tools.svc.cluster.local.", RecordType::A), ResponseCode::NoError);
    let e = Env::shared(b.update(&[], &[]));
    assert_negative(&e.ask("apps.svc.cluster.local.", RecordType::A), ResponseCode::NXDomain);
    assert_negative(&e.ask("web.apps.svc.cluster.local.", RecordType::A), ResponseCode::NXDomain);
    // A namespace name that is not a DNS label never shows.
    let bad = vec![std::sync::Arc::new(fixtures::cluster_ip("Bad_NS", "web", &["10.96.0.51"], &[]))];
    let z = b.update(&bad, &[]);
    assert_eq!(z.stats().skipped.len(), 1, "{:?}", z.stats().skipped);
    assert_negative(&Env::shared(z).ask("bad_ns.svc.cluster.local.", RecordType::A), ResponseCode::NXDomain);
}

#[test]
fn apex_soa_ns_and_the_dns_service_name() {
    let e = env();
    let m = e.ask("cluster.local.", RecordType::SOA);
    assert_eq!(m.answers().len(), 1);
    assert_eq!(m.answers()[0].record_type(), RecordType::SOA);
    let m = e.ask("cluster.local.", RecordType::NS);
    assert_eq!(m.answers().len(), 1);
    let RData::NS(ns) = m.answers()[0].data() else { panic!() };
    assert_eq!(ns.0.to_string(), "ns.dns.cluster.local.");
    assert_eq!(m.additionals().len(), 1);
    assert_eq!(addrs(&e.ask("ns.dns.cluster.local.", RecordType::A)), ["10.96.0.10"]);
    assert_negative(&e.ask("cluster.local.", RecordType::A), ResponseCode::NoError);
    assert_negative(&e.ask("dns.cluster.local.", RecordType::A), ResponseCode::NoError);
}

#[test]
fn dns_version_txt() {
    let e = env();
    let m = e.ask("dns-version.cluster.local.", RecordType::TXT);
    assert_eq!(m.answers().len(), 1);
    let RData::TXT(t) = m.answers()[0].data() else { panic!() };
    assert_eq!(t.to_string(), "1.1.0");
    assert_eq!(m.answers()[0].ttl(), 28800);
    assert_negative(&e.ask("dns-version.cluster.local.", RecordType::A), ResponseCode::NoError);
}

#[test]
fn srv_for_named_ports_of_a_cluster_ip_service() {
    let e = env();
    let m = e.ask("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV);
    assert_eq!(srvs(m.answers()), [(0, 100, 80, "web.default.svc.cluster.local.".to_string())]);
    assert_eq!(m.additionals().len(), 1, "{:?}", m.additionals());
    let m = e.ask("_dns._udp.kube-dns.kube-system.svc.cluster.local.", RecordType::SRV);
    assert_eq!(srvs(m.answers()), [(0, 100, 53, "kube-dns.kube-system.svc.cluster.local.".to_string())]);
    assert_negative(&e.ask("_dns._tcp.kube-dns.kube-system.svc.cluster.local.", RecordType::SRV), ResponseCode::NXDomain);
    // SRV at the service name: every port (CoreDNS), weight shared.
    let m = e.ask("kube-dns.kube-system.svc.cluster.local.", RecordType::SRV);
    let t = "kube-dns.kube-system.svc.cluster.local.".to_string();
    assert_eq!(srvs(m.answers()), [(0, 50, 53, t.clone()), (0, 50, 9153, t)]);
    // Other types at the SRV name: NODATA.
    assert_negative(&e.ask("_http._tcp.web.default.svc.cluster.local.", RecordType::A), ResponseCode::NoError);
}

#[test]
fn srv_additional_section_has_the_target_addresses() {
    let e = env();
    let m = e.ask("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV);
    let add: Vec<_> = m.additionals().iter().filter(|r| r.record_type() == RecordType::A).collect();
    assert_eq!(add.len(), 1);
    assert_eq!(add[0].name().to_string(), "web.default.svc.cluster.local.");
}

#[test]
fn headless_service_returns_ready_endpoints_and_hostnames() {
    let e = env();
    assert_eq!(addrs(&e.ask("db.default.svc.cluster.local.", RecordType::A)), ["10.244.1.21", "10.244.2.22"]);
    assert_eq!(addrs(&e.ask("db-0.db.default.svc.cluster.local.", RecordType::A)), ["10.244.1.21"]);
    assert_eq!(addrs(&e.ask("db-1.db.default.svc.cluster.local.", RecordType::A)), ["10.244.2.22"]);
    let m = e.ask("_postgres._tcp.db.default.svc.cluster.local.", RecordType::SRV);
    assert_eq!(
        srvs(m.answers()),
        [
            (0, 50, 5432, "db-0.db.default.svc.cluster.local.".to_string()),
            (0, 50, 5432, "db-1.db.default.svc.cluster.local.".to_string())
        ]
    );
    let mut add: Vec<String> = m
        .additionals()
        .iter()
        .filter(|r| r.record_type() == RecordType::A)
        .map(|r| format!("{} {}", r.name(), r.data()))
        .collect();
    add.sort();
    assert_eq!(add, ["db-0.db.default.svc.cluster.local. 10.244.1.21", "db-1.db.default.svc.cluster.local. 10.244.2.22"]);
}

#[test]
fn headless_endpoints_without_hostname_get_dashed_names() {
    let e = env();
    assert_eq!(addrs(&e.ask("anon.default.svc.cluster.local.", RecordType::A)), ["10.244.1.31", "10.244.1.32"]);
    assert_eq!(addrs(&e.ask("10-244-1-31.anon.default.svc.cluster.local.", RecordType::A)), ["10.244.1.31"]);
    let m = e.ask("anon.default.svc.cluster.local.", RecordType::SRV);
    assert_eq!(
        srvs(m.answers()),
        [
            (0, 50, 8080, "10-244-1-31.anon.default.svc.cluster.local.".to_string()),
            (0, 50, 8080, "10-244-1-32.anon.default.svc.cluster.local.".to_string())
        ]
    );
    // Endpoint names exist for ClusterIP services too (as in CoreDNS).
    assert_eq!(addrs(&e.ask("10-244-1-5.web.default.svc.cluster.local.", RecordType::A)), ["10.244.1.5"]);
}

#[test]
fn headless_without_ready_endpoints_is_nxdomain_unless_publish_not_ready() {
    let e = env();
    assert_negative(&e.ask("empty.default.svc.cluster.local.", RecordType::A), ResponseCode::NXDomain);
    let mut svc = fixtures::headless("default", "pending", &[("http", "TCP", 80)]);
    let slice = fixtures::slice("default", "pending", "p-1", &[(&["10.244.5.5"], Some("p-0"), false)], &[("http", "TCP", 80)]);
    let z = build_zone(&sample_config(), std::slice::from_ref(&svc), std::slice::from_ref(&slice));
    assert_negative(&Env::new(z).ask("pending.default.svc.cluster.local.", RecordType::A), ResponseCode::NXDomain);
    svc.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true);
    let z = build_zone(&sample_config(), &[svc], &[slice]);
    let e = Env::new(z);
    assert_eq!(addrs(&e.ask("pending.default.svc.cluster.local.", RecordType::A)), ["10.244.5.5"]);
    assert_eq!(addrs(&e.ask("p-0.pending.default.svc.cluster.local.", RecordType::A)), ["10.244.5.5"]);
}

#[test]
fn dual_stack_service_has_a_and_aaaa() {
    let e = env();
    assert_eq!(addrs(&e.ask("web6.dual.svc.cluster.local.", RecordType::A)), ["10.96.0.30"]);
    assert_eq!(addrs(&e.ask("web6.dual.svc.cluster.local.", RecordType::AAAA)), ["fd00::30"]);
    let m = e.ask("0.3.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.", RecordType::PTR);
    let RData::PTR(p) = m.answers()[0].data() else { panic!() };
    assert_eq!(p.0.to_string(), "web6.dual.svc.cluster.local.");
}

#[test]
fn ptr_for_service_and_endpoint_addresses() {
    let e = env();
    let ptr = |n: &str| -> Vec<String> {
        let m = e.ask(n, RecordType::PTR);
        assert!(m.authoritative());
        let mut v: Vec<String> = m.answers().iter().map(|r| r.data().to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(ptr("20.0.96.10.in-addr.arpa."), ["web.default.svc.cluster.local."]);
    assert_eq!(ptr("1.0.96.10.in-addr.arpa."), ["kubernetes.default.svc.cluster.local."]);
    assert_eq!(ptr("21.1.244.10.in-addr.arpa."), ["db-0.db.default.svc.cluster.local."]);
    assert_eq!(ptr("31.1.244.10.in-addr.arpa."), ["10-244-1-31.anon.default.svc.cluster.local."]);
    // Reverse names we know nothing about, and other types, fall through to upstream.
    let (o, _) = e.raw(&query("9.9.96.10.in-addr.arpa.", RecordType::PTR, None), POD, Transport::Udp, 0);
    assert!(matches!(o, Outcome::Forward(ref r) if matches!(r.kind, ForwardKind::Recurse)), "{o:?}");
    let (o, _) = e.raw(&query("20.0.96.10.in-addr.arpa.", RecordType::TXT, None), POD, Transport::Udp, 0);
    assert!(matches!(o, Outcome::Forward(_)), "{o:?}");
}

#[test]
fn external_name_is_a_cname() {
    let e = env();
    let m = e.ask("ext.default.svc.cluster.local.", RecordType::CNAME);
    assert_eq!(m.answers().len(), 1);
    let RData::CNAME(c) = m.answers()[0].data() else { panic!() };
    assert_eq!(c.0.to_string(), "www.example.com.");
    // Other types: the target is resolved upstream for clients allowed recursion...
    let (o, _) = e.raw(&query("ext.default.svc.cluster.local.", RecordType::A, None), POD, Transport::Udp, 0);
    match o {
        Outcome::Forward(r) => match &r.kind {
            ForwardKind::External(x) => assert_eq!(wire::name_to_string(&x.target), "www.example.com."),
            k => panic!("{k:?}"),
        },
        o => panic!("{o:?}"),
    }
    // ...and the others get the CNAME alone.
    let (m, _) = e.reply(&query("ext.default.svc.cluster.local.", RecordType::A, None), FOREIGN, Transport::Udp);
    assert_eq!(m.answers().len(), 1);
    assert_eq!(m.answers()[0].record_type(), RecordType::CNAME);
    assert!(!m.recursion_available());
}

#[test]
fn external_name_inside_the_zone_is_chased() {
    let e = env();
    let m = e.ask("alias.default.svc.cluster.local.", RecordType::A);
    assert_eq!(m.answers().len(), 2);
    assert_eq!(m.answers()[0].record_type(), RecordType::CNAME);
    assert_eq!(addrs(&m), ["10.96.0.20"]);
    let m = e.ask("alias.default.svc.cluster.local.", RecordType::AAAA);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert_eq!(m.answers().len(), 1);
    assert_eq!(m.name_servers().len(), 1);
}

#[test]
fn pod_names() {
    let e = env();
    assert_eq!(addrs(&e.ask("10-244-1-5.default.pod.cluster.local.", RecordType::A)), ["10.244.1.5"]);
    assert_eq!(addrs(&e.ask("10-244-9-9.any-namespace.pod.cluster.local.", RecordType::A)), ["10.244.9.9"]);
    assert_eq!(addrs(&e.ask("fd00--5.default.pod.cluster.local.", RecordType::AAAA)), ["fd00::5"]);
    let m = e.ask("10-244-1-5.default.pod.cluster.local.", RecordType::A);
    assert_eq!(m.answers()[0].ttl(), 30);
    assert!(m.authoritative());
    assert_negative(&e.ask("10-244-1-5.default.pod.cluster.local.", RecordType::AAAA), ResponseCode::NoError);
    assert_negative(&e.ask("default.pod.cluster.local.", RecordType::A), ResponseCode::NoError);
    for n in ["bogus.default.pod.cluster.local.", "1-2-3.default.pod.cluster.local.", "10-244-1-500.default.pod.cluster.local.", "a.10-244-1-5.default.pod.cluster.local."] {
        assert_negative(&e.ask(n, RecordType::A), ResponseCode::NXDomain);
    }
}

#[test]
fn edns_is_echoed_with_our_payload_size_and_do_bit() {
    let e = env();
    let (m, _) = e.reply(&query("web.default.svc.cluster.local.", RecordType::A, Some(4096)), POD, Transport::Udp);
    let edns = m.extensions().as_ref().expect("OPT in the response");
    assert_eq!(edns.max_payload(), 1232);
    assert!(!edns.flags().dnssec_ok);
    let (m, _) = e.reply(&query("web.default.svc.cluster.local.", RecordType::A, None), POD, Transport::Udp);
    assert!(m.extensions().is_none());
    // DO is copied (RFC 3225).
    let mut q = Message::from_vec(&query("nope.default.svc.cluster.local.", RecordType::A, Some(1232))).unwrap();
    q.extensions_mut().as_mut().unwrap().flags_mut().dnssec_ok = true;
    let (m, _) = e.reply(&q.to_vec().unwrap(), POD, Transport::Udp);
    assert!(m.extensions().as_ref().unwrap().flags().dnssec_ok);
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
}

#[test]
fn unknown_edns_version_is_badvers() {
    let e = env();
    let mut q = Message::from_vec(&query("web.default.svc.cluster.local.", RecordType::A, Some(1232))).unwrap();
    q.extensions_mut().as_mut().unwrap().set_version(1);
    let (m, _) = e.reply(&q.to_vec().unwrap(), POD, Transport::Udp);
    // 16 is BADVERS in an OPT-carrying response (hickory names it BADSIG, the same code).
    assert_eq!(u16::from(m.response_code()), 16);
    assert!(m.extensions().is_some());
    assert!(m.answers().is_empty());
}

#[test]
fn large_answers_are_truncated_over_udp_and_whole_over_tcp() {
    let e = env();
    // 200 A records: 3.2 KB.
    let (m, raw) = e.reply(&query("big.many.svc.cluster.local.", RecordType::A, None), POD, Transport::Udp);
    assert!(m.truncated());
    assert!(m.answers().is_empty());
    assert!(raw.len() <= 512);
    let (m, raw) = e.reply(&query("big.many.svc.cluster.local.", RecordType::A, Some(4096)), POD, Transport::Udp);
    assert!(m.truncated());
    assert!(raw.len() <= 1232);
    let (m, _) = e.reply(&query("big.many.svc.cluster.local.", RecordType::A, None), POD, Transport::Tcp);
    assert!(!m.truncated());
    assert_eq!(m.answers().len(), 200);
}

#[test]
fn additional_section_is_dropped_before_truncating() {
    let addrs_: Vec<String> = (1..=6).map(|i| format!("10.244.7.{i}")).collect();
    let a: Vec<[&str; 1]> = addrs_.iter().map(|s| [s.as_str()]).collect();
    let eps: Vec<fixtures::Ep<'_>> = a.iter().map(|x| (&x[..], None, true)).collect();
    let svc = fixtures::headless("default", "ten", &[("http", "TCP", 80)]);
    let slice = fixtures::slice("default", "ten", "ten-1", &eps, &[("http", "TCP", 80)]);
    let e = Env::new(build_zone(&sample_config(), &[svc], &[slice]));
    let q = query("_http._tcp.ten.default.svc.cluster.local.", RecordType::SRV, None);
    let (m, raw) = e.reply(&q, POD, Transport::Udp);
    assert!(!m.truncated());
    assert_eq!(m.answers().len(), 6);
    assert!(m.additionals().is_empty());
    assert!(raw.len() <= 512);
    let (m, raw) = e.reply(&q, POD, Transport::Tcp);
    assert_eq!(m.additionals().len(), 6);
    assert!(raw.len() > 512);
}

#[test]
fn multi_address_answers_rotate() {
    let e = env();
    let q = query("db.default.svc.cluster.local.", RecordType::A, None);
    let first = |rot| {
        let (_, raw) = e.raw(&q, POD, Transport::Udp, rot);
        let m = Message::from_vec(&raw).unwrap();
        (m.answers()[0].data().to_string(), addrs(&m))
    };
    let (a0, set0) = first(0);
    let (a1, set1) = first(1);
    assert_ne!(a0, a1);
    assert_eq!(set0, set1);
}

#[test]
fn malformed_queries() {
    let e = env();
    let good = query("web.default.svc.cluster.local.", RecordType::A, None);
    // Too short, or a response: no answer at all.
    assert!(matches!(e.raw(&good[..11], POD, Transport::Udp, 0).0, Outcome::Drop));
    let mut resp = good.clone();
    resp[2] |= 0x80;
    assert!(matches!(e.raw(&resp, POD, Transport::Udp, 0).0, Outcome::Drop));
    // Truncated question: FORMERR.
    let (m, _) = e.reply(&good[..good.len() - 2], POD, Transport::Udp);
    assert_eq!(m.response_code(), ResponseCode::FormErr);
    assert_eq!(m.id(), 0xbeef);
    // UPDATE: NOTIMP.
    let mut upd = good.clone();
    upd[2] = (upd[2] & 0x87) | (5 << 3);
    let (m, _) = e.reply(&upd, POD, Transport::Udp);
    assert_eq!(m.response_code(), ResponseCode::NotImp);
    // Zone transfers are refused.
    let (m, _) = e.reply(&query("cluster.local.", RecordType::AXFR, None), POD, Transport::Tcp);
    assert_eq!(m.response_code(), ResponseCode::Refused);
}

#[test]
fn recursion_only_for_allowed_clients() {
    let e = env();
    let q = query("www.example.com.", RecordType::A, None);
    let (m, _) = e.reply(&q, FOREIGN, Transport::Udp);
    assert_eq!(m.response_code(), ResponseCode::Refused);
    assert!(!m.recursion_available());
    // Cluster names are answered for everyone.
    let (m, _) = e.reply(&query("web.default.svc.cluster.local.", RecordType::A, None), FOREIGN, Transport::Udp);
    assert_eq!(addrs(&m), ["10.96.0.20"]);
    // Allowed clients are forwarded...
    for client in [POD, [127, 0, 0, 1]] {
        assert!(matches!(e.raw(&q, client, Transport::Udp, 0).0, Outcome::Forward(_)));
    }
    assert_eq!(e.counters.cache_misses.get(), 2);
}

#[test]
fn forward_cache_hits_are_rewritten_for_the_client() {
    let e = env();
    let mut up = Message::new();
    up.set_id(999).set_message_type(MessageType::Response).set_recursion_available(true);
    up.add_query(Query::query(Name::from_ascii("www.example.com.").unwrap(), RecordType::A));
    up.add_answer(Record::from_rdata(Name::from_ascii("www.example.com.").unwrap(), 300, RData::A(hickory_proto::rr::rdata::A([198, 18, 5, 5].into()))));
    let name = wire::name_from_str("www.example.com").unwrap();
    let stored = Instant::now() - std::time::Duration::from_secs(10);
    let entry = entry_from_response(&up.to_vec().unwrap(), &name, 1, 1, CachePolicy::default(), stored).unwrap();
    let mut kb = [0u8; CACHE_KEY_MAX];
    e.cache.insert(cache_key(&name, 1, 1, false, false, &mut kb), std::sync::Arc::new(entry));
    let (m, raw) = e.reply(&query("WWW.Example.COM.", RecordType::A, None), POD, Transport::Udp);
    assert_eq!(m.id(), 0xbeef);
    assert_eq!(addrs(&m), ["198.18.5.5"]);
    assert!(!m.authoritative());
    assert!(m.recursion_available());
    let ttl = m.answers()[0].ttl();
    assert!((289..=290).contains(&ttl), "{ttl}");
    assert!(raw.windows(7).any(|w| w == b"Example"));
    assert_eq!(e.counters.cache_hits.get(), 1);
    // DO set: a different key, so a miss.
    let (o, _) = e.raw(&query("www.example.com.", RecordType::A, Some(1232)), POD, Transport::Udp, 0);
    assert!(matches!(o, Outcome::Reply(_)), "EDNS without DO uses the same key: {o:?}");
}

#[test]
fn pending_zone_is_servfail_for_cluster_names() {
    let e = Env::new(Zone::pending(&sample_config()));
    let (m, _) = e.reply(&query("web.default.svc.cluster.local.", RecordType::A, None), POD, Transport::Udp);
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    assert!(!e.zone.is_synced());
}

#[test]
fn invalid_objects_are_skipped_and_counted() {
    let svcs = vec![
        fixtures::cluster_ip("default", "Bad_Name", &["10.96.0.99"], &[]),
        fixtures::cluster_ip("default", "noip", &[], &[]),
        fixtures::external_name("default", "ip", "10.1.2.3"),
        fixtures::cluster_ip("default", "ok", &["10.96.0.98"], &[("web_port", "TCP", 80)]),
    ];
    let z = build_zone(&sample_config(), &svcs, &[]);
    assert_eq!(z.stats().skipped.len(), 4, "{:?}", z.stats().skipped);
    let e = Env::new(z);
    assert_eq!(addrs(&e.ask("ok.default.svc.cluster.local.", RecordType::A)), ["10.96.0.98"]);
    assert_negative(&e.ask("noip.default.svc.cluster.local.", RecordType::A), ResponseCode::NXDomain);
}

/// Duplicate detection costs a bounded number of record scans per record added, however many
/// records a name has, and drops exactly the records `RData` equality calls equal (names
/// compare case-insensitively), keeping the first-added order.
#[test]
fn duplicate_records_are_found_without_scanning_the_whole_set() {
    const N: usize = 5_000;
    let apex = Name::from_ascii("cluster.local.").unwrap();
    let mut m = Model::new(apex);
    let ip: IpAddr = "10.244.0.5".parse().unwrap();
    let target = |i: usize| Name::from_ascii(format!("10-244-0-5.svc-{i}.default.svc.cluster.local.")).unwrap();
    for i in 0..N {
        m.add_reverse(ip, 30, &target(i));
    }
    for i in 0..N {
        // Again, in another case: duplicates all.
        m.add_reverse(ip, 30, &Name::from_ascii(target(i).to_string().to_ascii_uppercase()).unwrap());
    }
    let svc = Name::from_ascii("web.default.svc.cluster.local.").unwrap();
    for i in 0..N {
        m.add(addr_record(&svc, 30, IpAddr::from([10, 244, (i / 250) as u8, (i % 250) as u8])));
        m.add(Record::from_rdata(svc.clone(), 30, RData::SRV(SRV::new(0, 100, 80, target(i % 100)))));
    }
    // Relative and absolute names differ, as in RData's equality.
    let mut rel = target(0);
    rel.set_fqdn(false);
    m.add_reverse(ip, 30, &rel);
    assert_eq!(m.records(), N + 1 + N + 100);
    assert!(m.scanned <= (4 * N + 1) * (LINEAR_DEDUP + 1), "{} records scanned to add {} records", m.scanned, 4 * N + 1);
    let rn = wire_name(&reverse_name(ip));
    let set = &m.names[&rn].rrs[&ty::PTR];
    let first: Vec<String> = set.iter().take(3).map(|r| r.data().to_string()).collect();
    assert_eq!(first, [target(0).to_string(), target(1).to_string(), target(2).to_string()]);
    assert!(set.iter().all(|r| r.data().as_ptr().is_some_and(|p| p.0.to_string().starts_with("10-244-0-5.svc-"))), "the first case is kept");
}

#[test]
fn stats_and_zone_file() {
    let z = sample_zone();
    let s = z.stats();
    assert_eq!((s.services, s.headless, s.external_names), (10, 4, 2));
    assert_eq!(s.endpoints, 2 + 2 + 2 + 2 + 200);
    assert!(s.skipped.is_empty(), "{:?}", s.skipped);
    let f = z.to_zone_file();
    assert!(f.starts_with("$ORIGIN cluster.local.\ncluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5\n"), "{f}");
    assert!(f.contains("web.default.svc.cluster.local. 30 IN A 10.96.0.20\n"), "{f}");
    assert!(f.contains("_http._tcp.web.default.svc.cluster.local. 30 IN SRV 0 100 80 web.default.svc.cluster.local.\n"), "{f}");
    assert!(!f.contains("in-addr.arpa"));
    assert_eq!(z.domain(), "cluster.local.");
    assert_eq!(z.serial(), 1);
}

#[test]
fn other_cluster_domain() {
    let cfg = ZoneConfig { domain: "Corp.Internal".into(), ..sample_config() };
    let (svcs, slices) = fixtures::sample();
    let e = Env::new(build_zone(&cfg, &svcs, &slices));
    assert_eq!(addrs(&e.ask("web.default.svc.corp.internal.", RecordType::A)), ["10.96.0.20"]);
    let (o, _) = e.raw(&query("web.default.svc.cluster.local.", RecordType::A, None), POD, Transport::Udp, 0);
    assert!(matches!(o, Outcome::Forward(_)));
}

#[test]
fn rebuilding_is_deterministic() {
    let (svcs, slices) = fixtures::sample();
    let mut rev = svcs.clone();
    rev.reverse();
    let a = build_zone(&sample_config(), &svcs, &slices);
    let b = build_zone(&sample_config(), &rev, &slices);
    assert_eq!(a.to_zone_file(), b.to_zone_file());
    assert_eq!(a.names.len(), b.names.len());
}

#[test]
fn random_packets_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let seeds: Vec<Vec<u8>> = [
        ("web.default.svc.cluster.local.", RecordType::A),
        ("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV),
        ("10-244-1-5.default.pod.cluster.local.", RecordType::A),
        ("big.many.svc.cluster.local.", RecordType::A),
        ("www.example.com.", RecordType::AAAA),
        ("20.0.96.10.in-addr.arpa.", RecordType::PTR),
    ]
    .iter()
    .flat_map(|(n, t)| [query(n, *t, None), query(n, *t, Some(1232))])
    .collect();
    for i in 0..20_000 {
        let pkt: Vec<u8> = if i % 4 == 0 {
            let len = rng.gen_range(0..600);
            (0..len).map(|_| rng.gen()).collect()
        } else {
            let mut p = seeds[i % seeds.len()].clone();
            for _ in 0..rng.gen_range(1..8) {
                match rng.gen_range(0..4) {
                    0 if !p.is_empty() => {
                        let at = rng.gen_range(0..p.len());
                        p[at] = rng.gen();
                    }
                    1 if !p.is_empty() => {
                        let at = rng.gen_range(0..p.len());
                        p.truncate(at);
                    }
                    2 => {
                        let at = rng.gen_range(0..=p.len());
                        p.insert(at, rng.gen());
                    }
                    _ => {
                        let at = rng.gen_range(0..12.min(p.len().max(1)));
                        if at < p.len() {
                            p[at] = 0xff;
                        }
                    }
                }
            }
            p
        };
        crate::fuzzing::request_path(&pkt);
    }
}

/// Not a test: the cost of the request path alone (no sockets). `cargo test --release -p
/// netd-dns --lib handle_throughput -- --ignored --nocapture`
#[test]
#[ignore]
fn handle_throughput() {
    let (svcs, slices) = fixtures::synthetic(1000, 100);
    let e = Env::new(build_zone(&sample_config(), &svcs, &slices));
    for (label, name, t) in [
        ("A hit", "svc-5.ns-5.svc.cluster.local.", RecordType::A),
        ("NXDOMAIN", "www.example5.com.ns-5.svc.cluster.local.", RecordType::A),
        ("SRV", "_http._tcp.svc-5.ns-5.svc.cluster.local.", RecordType::SRV),
    ] {
        let q = query(name, t, None);
        let ctx = Ctx { zone: &e.zone, sky: &e.sky, hosts: &e.hosts, cache: &e.cache, acl: &e.acl, counters: &e.counters, udp_cap: 1232, rotation: 0 };
        let mut out = vec![0u8; 4096];
        let n = 2_000_000;
        let t0 = Instant::now();
        for _ in 0..n {
            let o = handle(&ctx, std::hint::black_box(&q), IpAddr::from(POD), Transport::Udp, &mut out);
            std::hint::black_box(o);
        }
        let ns = t0.elapsed().as_nanos() as f64 / n as f64;
        println!("{label}: {ns:.0} ns/query");
    }
}
