//! Peer-connection settings: user-facing config, ICE timeouts and servers, and
//! the webrtc `API` object built from them.

use std::net::IpAddr;
use std::time::Duration;

use webrtc::api::APIBuilder;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::ice::network_type::NetworkType;
use webrtc::ice::url::{ProtoType, SchemeType, Url};
use webrtc::ice_transport::ice_server::RTCIceServer;

use super::turn_tcp::TcpTurnBridge;

/// ICE: time without any inbound traffic before the agent goes `disconnected`
/// (webrtc-rs default: 5 s). A `disconnected` connection is reported as `Closed`. The same
/// as the default `dc_timeout`: an open channel carries pings every second anyway.
pub(super) const ICE_DISCONNECTED_TIMEOUT: Duration = Duration::from_secs(3);
/// ICE: extra time after `disconnected` before `failed` (webrtc-rs default: 25 s).
/// While still checking (never connected) ICE fails after
/// `ICE_DISCONNECTED_TIMEOUT + ICE_FAILED_TIMEOUT` (4 s): within the default
/// `upgrade_timeout` (5 s), so a failed upgrade says `IceFailed`. Measured in the NAT lab,
/// the slowest path that works (TURN, which webrtc-rs accepts only after 2 s) is up in
/// ~2.2 s.
pub(super) const ICE_FAILED_TIMEOUT: Duration = Duration::from_secs(1);
/// ICE keepalive interval when no other traffic flows (webrtc-rs default: 2 s): a third
/// of the disconnected timeout.
const ICE_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// Settings for peer connections (from user options).
#[derive(Clone, Debug)]
pub(crate) struct RtcConfig {
    /// ICE servers: urls + optional username/credential.
    pub ice_servers: Vec<IceServerConfig>,
    /// Extra trusted roots (PEM) for `turns:` servers.
    pub turn_tls_roots: Vec<Vec<u8>>,
    /// Only gather loopback candidates (127.0.0.1 / ::1): used by tests, demo and benchmark.
    /// ICE servers are ignored in this mode (their candidates could not be loopback).
    pub loopback_only: bool,
    /// Disable mDNS candidates (always true in our tests; default true).
    pub disable_mdns: bool,
    /// Trickle ICE: send candidates as found. If false, wait for gathering to complete and put all candidates in the SDP.
    pub trickle: bool,
    /// If set, no candidate at all is gathered (every interface/IP filtered out, ICE
    /// servers ignored): ICE can never succeed. Used to test failure fallback for real.
    pub block_all_candidates: bool,
}

impl Default for RtcConfig {
    fn default() -> Self {
        Self {
            ice_servers: Vec::new(),
            turn_tls_roots: Vec::new(),
            loopback_only: false,
            disable_mdns: true,
            trickle: true,
            block_all_candidates: false,
        }
    }
}

/// One ICE (STUN/TURN) server.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub(crate) struct IceServerConfig {
    /// Server URLs, e.g. `stun:stun.example.org:3478`.
    pub urls: Vec<String>,
    /// TURN username.
    pub username: Option<String>,
    /// TURN credential.
    pub credential: Option<String>,
}

/// Timeouts given to the ICE agent (overridable in tests to measure defaults).
#[derive(Clone, Copy, Debug)]
pub(super) struct IceTimeouts {
    pub(super) disconnected: Option<Duration>,
    pub(super) failed: Option<Duration>,
    pub(super) keepalive: Option<Duration>,
}

pub(super) const OUR_ICE_TIMEOUTS: IceTimeouts = IceTimeouts {
    disconnected: Some(ICE_DISCONNECTED_TIMEOUT),
    failed: Some(ICE_FAILED_TIMEOUT),
    keepalive: Some(ICE_KEEPALIVE_INTERVAL),
};

/// Builds the webrtc `API` object for a config.
pub(super) fn build_api(cfg: &RtcConfig, timeouts: IceTimeouts) -> webrtc::api::API {
    let mut se = SettingEngine::default();
    if cfg.disable_mdns {
        se.set_ice_multicast_dns_mode(MulticastDnsMode::Disabled);
    }
    se.set_network_types(vec![NetworkType::Udp4, NetworkType::Udp6]);
    se.set_ice_timeouts(timeouts.disconnected, timeouts.failed, timeouts.keepalive);
    // Host candidates are accepted immediately (this is also the default).
    se.set_host_acceptance_min_wait(Some(Duration::ZERO));
    // A check from the remote often arrives before its trickled candidate: the
    // pair is then peer-reflexive, which webrtc-rs would only nominate after 1 s.
    se.set_prflx_acceptance_min_wait(Some(Duration::ZERO));
    if cfg.block_all_candidates {
        se.set_interface_filter(Box::new(|_: &str| false));
        se.set_ip_filter(Box::new(|_: IpAddr| false));
    } else if cfg.loopback_only {
        se.set_include_loopback_candidate(true);
        // "lo" on Linux, "lo0" on BSD/macOS; the IP filter is the real guard.
        se.set_interface_filter(Box::new(|name: &str| name.starts_with("lo")));
        se.set_ip_filter(Box::new(|ip: IpAddr| ip.is_loopback()));
    }
    APIBuilder::new().with_setting_engine(se).build()
}

/// ICE servers for a config (none when only loopback/no candidates are wanted), and the
/// bridges that carry its `turn:...?transport=tcp` URLs (see [`TcpTurnBridge`]): they
/// must live as long as the peer connection.
pub(super) async fn ice_servers(cfg: &RtcConfig) -> (Vec<RTCIceServer>, Vec<TcpTurnBridge>) {
    if cfg.loopback_only || cfg.block_all_candidates {
        if !cfg.ice_servers.is_empty() {
            tracing::debug!("loopback-only/blocked candidates: ICE servers ignored");
        }
        return (Vec::new(), Vec::new());
    }
    let mut bridges = Vec::new();
    let mut servers = Vec::with_capacity(cfg.ice_servers.len());
    for s in &cfg.ice_servers {
        let mut urls = Vec::with_capacity(s.urls.len());
        for raw in &s.urls {
            match turn_over_tcp(raw) {
                Some((server, tls)) => {
                    match TcpTurnBridge::start(server, tls, &cfg.turn_tls_roots).await {
                        Ok(bridge) => {
                            urls.push(format!("turn:{}?transport=udp", bridge.local_addr()));
                            bridges.push(bridge);
                        }
                        Err(e) => tracing::warn!(url = %raw, error = %e, "no TURN/TCP bridge"),
                    }
                }
                None => urls.push(raw.clone()),
            }
        }
        servers.push(RTCIceServer {
            urls,
            username: s.username.clone().unwrap_or_default(),
            credential: s.credential.clone().unwrap_or_default(),
        });
    }
    (servers, bridges)
}

/// `host:port` of a `turn:` URL over TCP or a `turns:` URL (with the host name TLS must
/// check), which the ICE agent cannot use by itself.
fn turn_over_tcp(raw: &str) -> Option<(String, Option<String>)> {
    let url = Url::parse_url(raw).ok()?;
    let tls = match url.scheme {
        SchemeType::Turn if url.proto == ProtoType::Tcp => None,
        SchemeType::Turns if url.proto == ProtoType::Tcp => Some(url.host.clone()),
        _ => return None,
    };
    let addr = if url.host.contains(':') {
        format!("[{}]:{}", url.host, url.port)
    } else {
        format!("{}:{}", url.host, url.port)
    };
    Some((addr, tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_turn_over_tcp_urls_need_a_bridge() {
        let tcp = turn_over_tcp("turn:turn.example.org:3478?transport=tcp");
        assert_eq!(tcp, Some(("turn.example.org:3478".into(), None)));
        let v6 = turn_over_tcp("turn:[::1]:3478?transport=tcp");
        assert_eq!(v6, Some(("[::1]:3478".into(), None)));
        let tls = turn_over_tcp("turns:turn.example.org:5349");
        let name = Some("turn.example.org".to_owned());
        assert_eq!(tls, Some(("turn.example.org:5349".into(), name)));
        for other in [
            "turn:turn.example.org:3478",
            "turn:turn.example.org:3478?transport=udp",
            "stun:stun.example.org:3478",
            "turns:turn.example.org:5349?transport=udp",
            "not a url",
        ] {
            assert_eq!(turn_over_tcp(other), None, "{other}");
        }
    }
}
