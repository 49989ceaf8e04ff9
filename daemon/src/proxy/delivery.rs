//! The pod-netns routing that lets the daemon connect to the app with the client's
//! IP as source (NOTES-kernel: "Source-IP preservation"): packets carrying the
//! delivery mark are routed to `lo` (table [`DELIVERY_TABLE`], looked up at
//! [`DELIVERY_PREF`], before the `local` table, which moves from pref 0 to
//! [`MOVED_LOCAL_PREF`]), and `tcp_fwmark_accept` makes the app's accepted socket
//! inherit the mark so that its replies come back to the daemon's transparent socket.
//!
//! Everything is done over rtnetlink from a socket created inside the pod's netns
//! (on the dedicated thread of [`PodHandle::run_in_netns`]); no `ip` binary is run.
//! Both directions are idempotent: [`setup`] on a pod that has the routing (a pod
//! resumed after a daemon restart) changes nothing, [`teardown`] on a pod without it
//! neither. The `local` lookup never lapses: setup adds it at pref 100 before
//! removing it from pref 0, teardown the other way round.

use std::{io, net::Ipv4Addr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::capture::PodHandle;
use crate::netns::NetnsError;

/// The routing table of marked (delivery) packets in each pod netns.
pub const DELIVERY_TABLE: u32 = 100;
/// The priority of the rule sending marked packets to [`DELIVERY_TABLE`].
pub const DELIVERY_PREF: u32 = 10;
/// Where the `local` table lookup moves to while the pod is enrolled.
pub const MOVED_LOCAL_PREF: u32 = 100;
/// `RT_TABLE_LOCAL`.
const LOCAL_TABLE: u32 = 255;
/// Where each network namespace starts with its `local` lookup.
const DEFAULT_LOCAL_PREF: u32 = 0;
/// `tcp_fwmark_accept` of the calling thread's netns (`/proc/sys/net` resolves
/// against the opener's netns).
const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
/// `NLMSG_ALIGNTO`.
const NLMSG_ALIGN: usize = 4;

/// Why the delivery routing of a pod could not be installed or removed.
#[derive(Debug, thiserror::Error)]
#[error("delivery routing of pod {pod}")]
pub struct DeliveryError {
    /// `namespace/name`.
    pub pod: String,
    /// What failed in the pod's netns.
    #[source]
    pub source: NetnsError,
}

/// One rtnetlink step that failed, e.g. "adding rule pref 10 fwmark 0x53a lookup 100".
#[derive(Debug, thiserror::Error)]
#[error("{step}")]
struct StepError {
    step: String,
    #[source]
    source: io::Error,
}

/// A policy routing rule as far as this module cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rule {
    /// Its priority (`pref`).
    pub(crate) pref: u32,
    /// The table it looks up (`None` for other actions).
    pub(crate) table: Option<u32>,
    /// The firewall mark it matches, if any.
    pub(crate) fwmark: Option<u32>,
}

/// A route-netlink socket of the calling thread's netns.
struct Rtnl {
    socket: Socket,
    seq: u32,
}

/// Installs the delivery routing in the pod's netns (idempotent: a resumed pod
/// already has it).
pub fn setup(pod: &PodHandle, mark: u32) -> Result<(), DeliveryError> {
    pod.run_in_netns(move || install(mark))
        .map_err(|source| DeliveryError {
            pod: pod.pod().name.clone(),
            source,
        })
}

/// Removes the delivery routing from the pod's netns, restoring the `local` lookup at
/// pref 0 (idempotent: fine on a pod that never had it). `tcp_fwmark_accept` stays
/// on: without marked packets it changes nothing, and its value before setup is not
/// known.
pub fn teardown(pod: &PodHandle, mark: u32) -> Result<(), DeliveryError> {
    pod.run_in_netns(move || remove(mark))
        .map_err(|source| DeliveryError {
            pod: pod.pod().name.clone(),
            source,
        })
}

/// [`setup`] in the calling thread's netns.
pub(crate) fn install(mark: u32) -> io::Result<()> {
    std::fs::write(FWMARK_ACCEPT, "1").map_err(|e| step(format!("writing {FWMARK_ACCEPT}"), e))?;
    let mut rtnl = Rtnl::open()?;
    let rules = rtnl.rules()?;
    let local_at = |pref| {
        rules.contains(&Rule {
            pref,
            table: Some(LOCAL_TABLE),
            fwmark: None,
        })
    };
    if !local_at(MOVED_LOCAL_PREF) {
        rtnl.add_rule(MOVED_LOCAL_PREF, LOCAL_TABLE, None)?;
    }
    if local_at(DEFAULT_LOCAL_PREF) {
        rtnl.del_rule(DEFAULT_LOCAL_PREF, LOCAL_TABLE, None)?;
    }
    let ours = Rule {
        pref: DELIVERY_PREF,
        table: Some(DELIVERY_TABLE),
        fwmark: Some(mark),
    };
    // A delivery rule of another mark (a daemon configured differently before) goes.
    for stale in rules
        .iter()
        .filter(|r| r.pref == DELIVERY_PREF && r.table == Some(DELIVERY_TABLE) && **r != ours)
    {
        rtnl.del_rule(stale.pref, DELIVERY_TABLE, stale.fwmark)?;
    }
    if !rules.contains(&ours) {
        rtnl.add_rule(DELIVERY_PREF, DELIVERY_TABLE, Some(mark))?;
    }
    let lo = loopback_index()?;
    rtnl.replace_local_default_route(lo)
}

/// [`teardown`] in the calling thread's netns.
pub(crate) fn remove(mark: u32) -> io::Result<()> {
    let mut rtnl = Rtnl::open()?;
    let rules = rtnl.rules()?;
    let local_at = |pref| {
        rules.contains(&Rule {
            pref,
            table: Some(LOCAL_TABLE),
            fwmark: None,
        })
    };
    if !local_at(DEFAULT_LOCAL_PREF) {
        rtnl.add_rule(DEFAULT_LOCAL_PREF, LOCAL_TABLE, None)?;
    }
    if local_at(MOVED_LOCAL_PREF) {
        rtnl.del_rule(MOVED_LOCAL_PREF, LOCAL_TABLE, None)?;
    }
    let ours = Rule {
        pref: DELIVERY_PREF,
        table: Some(DELIVERY_TABLE),
        fwmark: Some(mark),
    };
    if rules.contains(&ours) {
        rtnl.del_rule(DELIVERY_PREF, DELIVERY_TABLE, Some(mark))?;
    }
    let lo = loopback_index()?;
    rtnl.del_local_default_route(lo)
}

fn step(step: String, source: io::Error) -> io::Error {
    let kind = source.kind();
    io::Error::new(kind, StepError { step, source })
}

fn loopback_index() -> io::Result<u32> {
    nix::net::if_::if_nametoindex("lo").map_err(|e| step("looking up lo".to_owned(), e.into()))
}

fn describe_rule(pref: u32, table: u32, fwmark: Option<u32>) -> String {
    match fwmark {
        Some(mark) => format!("rule pref {pref} fwmark {mark:#x} lookup {table}"),
        None => format!("rule pref {pref} lookup {table}"),
    }
}

fn inet_route() -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = AddressFamily::Inet;
    route
}

impl Rule {
    fn from_message(message: &RuleMessage) -> Self {
        let mut rule = Self {
            // The kernel leaves out FRA_PRIORITY for pref 0.
            pref: 0,
            table: (message.header.action == RuleAction::ToTable)
                .then_some(u32::from(message.header.table)),
            fwmark: None,
        };
        for attribute in &message.attributes {
            match attribute {
                RuleAttribute::Priority(p) => rule.pref = *p,
                RuleAttribute::Table(t) if rule.table.is_some() => rule.table = Some(*t),
                RuleAttribute::FwMark(m) => rule.fwmark = Some(*m),
                _ => {}
            }
        }
        rule
    }
}

impl Rtnl {
    fn open() -> io::Result<Self> {
        let opening = |e| step("opening a route netlink socket".to_owned(), e);
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(opening)?;
        socket.bind_auto().map_err(opening)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(opening)?;
        Ok(Self { socket, seq: 0 })
    }

    fn rules(&mut self) -> io::Result<Vec<Rule>> {
        let mut query = RuleMessage::default();
        query.header.family = AddressFamily::Inet;
        let messages = self
            .dump(RouteNetlinkMessage::GetRule(query))
            .map_err(|e| step("listing the rules".to_owned(), e))?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => Some(Rule::from_message(r)),
                _ => None,
            })
            .collect())
    }

    /// `ip rule add pref PREF [fwmark MARK] lookup TABLE`, refusing duplicates
    /// (without `NLM_F_EXCL` the kernel would add the same rule twice).
    fn add_rule(&mut self, pref: u32, table: u32, fwmark: Option<u32>) -> io::Result<()> {
        let rule = rule_message(pref, table, fwmark);
        match self.ack(
            RouteNetlinkMessage::NewRule(rule),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
        .map_err(|e| step(format!("adding {}", describe_rule(pref, table, fwmark)), e))
    }

    /// `ip rule del pref PREF [fwmark MARK] lookup TABLE`. With pref 0 the kernel
    /// matches any pref: only call it for a rule the dump showed (the lowest pref
    /// comes first, so it is the one removed).
    fn del_rule(&mut self, pref: u32, table: u32, fwmark: Option<u32>) -> io::Result<()> {
        let rule = rule_message(pref, table, fwmark);
        match self.ack(RouteNetlinkMessage::DelRule(rule), 0) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
        .map_err(|e| {
            step(
                format!("removing {}", describe_rule(pref, table, fwmark)),
                e,
            )
        })
    }

    /// `ip route replace local 0.0.0.0/0 dev lo table DELIVERY_TABLE`.
    fn replace_local_default_route(&mut self, lo: u32) -> io::Result<()> {
        let mut route = local_default_route(lo);
        route.header.protocol = RouteProtocol::Boot;
        route.header.scope = RouteScope::Host;
        self.ack(
            RouteNetlinkMessage::NewRoute(route),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(|e| {
            step(
                format!("adding route local 0.0.0.0/0 dev lo table {DELIVERY_TABLE}"),
                e,
            )
        })
    }

    /// `ip route del local 0.0.0.0/0 dev lo table DELIVERY_TABLE`; absent is fine.
    fn del_local_default_route(&mut self, lo: u32) -> io::Result<()> {
        let mut route = local_default_route(lo);
        // "Any scope", as `ip route del` asks.
        route.header.scope = RouteScope::NoWhere;
        match self.ack(RouteNetlinkMessage::DelRoute(route), 0) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
        .map_err(|e| {
            step(
                format!("removing route local 0.0.0.0/0 dev lo table {DELIVERY_TABLE}"),
                e,
            )
        })
    }

    /// Sends a request asking for an acknowledgement and waits for it.
    fn ack(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let seq = self.send(message, NLM_F_REQUEST | NLM_F_ACK | flags)?;
        self.receive(seq, |_| {}).map(drop)
    }

    /// Sends a dump request and collects the answers.
    fn dump(&mut self, message: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let seq = self.send(message, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut out = Vec::new();
        self.receive(seq, |m| out.push(m))?;
        Ok(out)
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        Ok(self.seq)
    }

    /// Reads the answers to request `seq` until its acknowledgement (`Ok`), error
    /// (`Err`) or end of dump, passing every inner message to `each`.
    fn receive(&mut self, seq: u32, mut each: impl FnMut(RouteNetlinkMessage)) -> io::Result<()> {
        loop {
            let (buf, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < buf.len() {
                let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..])
                    .map_err(|e| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("malformed route netlink answer: {e}"),
                        )
                    })?;
                let len = message.header.length as usize;
                if len == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "route netlink answer of length 0",
                    ));
                }
                offset += len.next_multiple_of(NLMSG_ALIGN);
                if message.header.sequence_number != seq {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(_) => Err(e.to_io()),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::InnerMessage(m) => each(m),
                    _ => {}
                }
            }
        }
    }
}

fn rule_message(pref: u32, table: u32, fwmark: Option<u32>) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = AddressFamily::Inet;
    rule.header.action = RuleAction::ToTable;
    rule.header.table = u8::try_from(table).unwrap_or(0);
    rule.attributes.push(RuleAttribute::Priority(pref));
    rule.attributes.push(RuleAttribute::Table(table));
    if let Some(mark) = fwmark {
        rule.attributes.push(RuleAttribute::FwMark(mark));
        rule.attributes.push(RuleAttribute::FwMask(u32::MAX));
    }
    rule
}

fn local_default_route(lo: u32) -> RouteMessage {
    let mut route = inet_route();
    route.header.destination_prefix_length = 0;
    route.header.table = u8::try_from(DELIVERY_TABLE).unwrap_or(0);
    route.header.kind = RouteType::Local;
    route
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(
            Ipv4Addr::UNSPECIFIED,
        )));
    route.attributes.push(RouteAttribute::Table(DELIVERY_TABLE));
    route.attributes.push(RouteAttribute::Oif(lo));
    route
}

#[cfg(test)]
mod tests {
    use nix::sched::{CloneFlags, unshare};

    use super::*;

    const MARK: u32 = 0x53a;

    /// The rules of the calling thread's netns (IPv4), in the kernel's order.
    fn rules() -> io::Result<Vec<Rule>> {
        Rtnl::open()?.rules()
    }

    /// Whether the calling thread's netns has the delivery route (`local 0.0.0.0/0 dev lo`
    /// in [`DELIVERY_TABLE`]).
    fn has_delivery_route() -> io::Result<bool> {
        let lo = loopback_index()?;
        let routes = Rtnl::open()?.dump(RouteNetlinkMessage::GetRoute(inet_route()))?;
        Ok(routes.iter().any(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => {
                r.header.kind == RouteType::Local
                    && r.header.destination_prefix_length == 0
                    && route_table(r) == DELIVERY_TABLE
                    && r.attributes.contains(&RouteAttribute::Oif(lo))
            }
            _ => false,
        }))
    }

    /// The table of a route: `RTA_TABLE` when present (tables above 255), else the header's.
    fn route_table(route: &RouteMessage) -> u32 {
        route
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(route.header.table))
    }

    /// Runs `f` on a thread of its own in a new, empty network namespace (gone with
    /// the thread). Needs root.
    fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            unshare(CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn local(pref: u32) -> Rule {
        Rule {
            pref,
            table: Some(LOCAL_TABLE),
            fwmark: None,
        }
    }

    /// `ip rule show` as the kernel reports it to iproute2: an independent view.
    fn ip_rules() -> String {
        let out = std::process::Command::new("ip")
            .args(["-4", "rule", "show"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn setup_is_idempotent_and_teardown_restores_the_default_rules() {
        in_new_netns(|| {
            let before = rules().unwrap();
            assert!(before.contains(&local(0)), "{before:?}");
            let ours = Rule {
                pref: DELIVERY_PREF,
                table: Some(DELIVERY_TABLE),
                fwmark: Some(MARK),
            };

            for _ in 0..2 {
                install(MARK).unwrap();
                let after = rules().unwrap();
                assert!(!after.contains(&local(0)), "{after:?}");
                assert_eq!(after.iter().filter(|r| **r == local(100)).count(), 1);
                assert_eq!(after.iter().filter(|r| **r == ours).count(), 1);
                assert!(has_delivery_route().unwrap());
                assert_eq!(std::fs::read_to_string(FWMARK_ACCEPT).unwrap().trim(), "1");
            }
            let shown = ip_rules();
            assert!(
                shown.contains("10:\tfrom all fwmark 0x53a lookup 100"),
                "{shown}"
            );
            assert!(shown.contains("100:\tfrom all lookup local"), "{shown}");
            assert!(!shown.lines().any(|l| l.starts_with("0:\t")), "{shown}");

            for _ in 0..2 {
                remove(MARK).unwrap();
                assert_eq!(rules().unwrap(), before);
                assert!(!has_delivery_route().unwrap());
            }
        });
    }

    #[test]
    fn setup_replaces_a_delivery_rule_of_another_mark() {
        in_new_netns(|| {
            install(0x99).unwrap();
            install(MARK).unwrap();
            let delivery: Vec<Rule> = rules()
                .unwrap()
                .into_iter()
                .filter(|r| r.pref == DELIVERY_PREF)
                .collect();
            assert_eq!(
                delivery,
                [Rule {
                    pref: DELIVERY_PREF,
                    table: Some(DELIVERY_TABLE),
                    fwmark: Some(MARK),
                }]
            );
        });
    }

    /// The routing does what it is for: the daemon's marked transparent socket, bound
    /// to a client address that is not local, reaches an app on the pod's own address
    /// and gets its replies (without the routing they go nowhere and the connect
    /// times out).
    #[test]
    fn a_marked_transparent_socket_reaches_the_app_with_the_client_address() {
        in_new_netns(|| {
            for args in [
                &["link", "set", "lo", "up"][..],
                &["addr", "add", "10.1.1.1/32", "dev", "lo"],
            ] {
                let status = std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .unwrap();
                assert!(status.success(), "ip {args:?}");
            }
            install(MARK).unwrap();
            let app = std::net::TcpListener::bind("10.1.1.1:0").unwrap();
            let target = app.local_addr().unwrap();
            let client: std::net::SocketAddrV4 = "10.9.9.9:0".parse().unwrap();
            let mark = crate::netns::SocketMark::new(MARK).unwrap();
            let socket = crate::netns::transparent_tcp_socket(client, mark).unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let connected = runtime.block_on(async {
                let connect = socket.into_tokio().connect(target);
                tokio::time::timeout(std::time::Duration::from_secs(5), connect).await
            });
            let _stream = connected
                .expect("the connect did not complete within 5 s")
                .unwrap();
            let (_, peer) = app.accept().unwrap();
            assert_eq!(peer.ip().to_string(), "10.9.9.9");
        });
    }
}
