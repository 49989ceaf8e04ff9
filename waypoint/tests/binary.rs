//! The `ambit-waypoint` binary against the real `ambit-controller` in local mode, on
//! loopback: the waypoint authenticates with its bootstrap token, subscribes as its
//! Gateway, gets its certificate from the controller's CA, accepts the controller's
//! translation of a VirtualService + DestinationRule + HTTPRoute + policies scenario
//! (no NACK), becomes ready, serves HBONE with that certificate (fronted VIP accepted,
//! anything else refused) and drains on SIGTERM.
//!
//! Needs the workspace binaries (`cargo build --workspace --bins`); fails, never
//! skips, without them.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test with its location"
)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ambit_hbone::{CertStore, ConnectRequest, Pool, PoolConfig};
use ambit_identity::{
    CertificateAuthority, SpiffeId, TrustDomain, WorkloadCertificate, WorkloadKey,
};
use ambit_test_support::{bin_path, eventually_async};
use http::StatusCode;

/// The controller's own waypoint scenario (`payment` fronted by `production/waypoint`,
/// `inventory` not), in the simulated cluster's format.
const SCENARIO: &str = include_str!("../../controller/tests/fixtures/waypoint.yaml");
const TOKEN: &str = "waypoint-bootstrap-token";
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

/// A child process killed when dropped (a failed test leaves nothing running).
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(name: &'static str, args: &[String], log: PathBuf) -> Self {
        let child = Command::new(bin_path(name).unwrap())
            .args(args)
            .env("LOG_LEVEL", "info,ambit_waypoint=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { name, child, log }
    }

    fn log(&self) -> String {
        format!(
            "--- {} log ---\n{}",
            self.name,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free right now (the processes bind it shortly after).
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn both(a: &Proc, b: &Proc) -> String {
    format!("{}\n{}", a.log(), b.log())
}

async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, String)> {
    let (status, body) = ambit_runtime::admin::get(addr, path).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test]
async fn the_binary_subscribes_gets_its_certificate_and_serves_hbone() {
    let _ = rustls::crypto::CryptoProvider::install_default(
        ambit_identity::tls::crypto_provider().as_ref().clone(),
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // The mesh CA, persisted where the controller loads it, so the test can mint the
    // client's certificate.
    let td = TrustDomain::new("cluster.local").unwrap();
    let ca = CertificateAuthority::generate(td.clone(), Duration::from_secs(3600)).unwrap();
    ca.save_to_dir(&root.join("controller")).unwrap();
    write(&root.join("config/waypoint.yaml"), SCENARIO);
    write(
        &root.join("tokens.yaml"),
        &format!("tokens:\n- {{token: {TOKEN}, waypoint: production/waypoint}}\n"),
    );
    write(&root.join("waypoint.token"), TOKEN);

    let grpc = free_port();
    let controller = Proc::start(
        "ambit-controller",
        &[
            "--config-dir".into(),
            root.join("config").display().to_string(),
            "--bootstrap-tokens".into(),
            root.join("tokens.yaml").display().to_string(),
            "--state-dir".into(),
            root.join("controller").display().to_string(),
            "--grpc-addr".into(),
            grpc.to_string(),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--readiness-addr".into(),
            "127.0.0.1:0".into(),
        ],
        root.join("controller.log"),
    );
    let admin = free_port();
    let mut waypoint = Proc::start(
        "ambit-waypoint",
        &[
            "--name".into(),
            "waypoint".into(),
            "--namespace".into(),
            "production".into(),
            "--controller-addr".into(),
            format!("http://{grpc}"),
            "--token-file".into(),
            root.join("waypoint.token").display().to_string(),
            "--state-dir".into(),
            root.join("waypoint").display().to_string(),
            "--hbone-addr".into(),
            "127.0.0.1:0".into(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--admin-addr".into(),
            admin.to_string(),
            "--readiness-addr".into(),
            "127.0.0.1:0".into(),
            "--drain-timeout".into(),
            "5s".into(),
        ],
        root.join("waypoint.log"),
    );

    // Ready once the configuration and the certificate are in.
    let ready = eventually_async("the waypoint ready", DEADLINE, POLL, || async {
        let (status, body) = get(admin, "/healthz/ready").await?;
        anyhow::ensure!(status == StatusCode::OK, "{status}: {body}");
        Ok(())
    })
    .await;
    assert!(ready.is_ok(), "{ready:?}\n{}", both(&controller, &waypoint));

    let (status, body) = get(admin, "/config_dump").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        dump["identity"], "spiffe://cluster.local/ns/production/sa/waypoint",
        "{dump:#}"
    );
    assert!(
        dump["subscription"]["lastNack"].is_null(),
        "NACKed: {dump:#}"
    );
    let services = dump["snapshot"]["services"].as_array().unwrap();
    let payment = services
        .iter()
        .find(|s| s["name"] == "production/payment")
        .unwrap_or_else(|| panic!("payment not in {dump:#}"));
    assert_eq!(payment["fronted"], true, "{dump:#}");
    let routes = payment["routes"].as_array().unwrap();
    assert!(
        routes.len() >= 2
            && routes
                .iter()
                .all(|r| !r.as_str().unwrap().starts_with("(default")),
        "payment's routes should come from its HTTPRoute and VirtualService: {routes:?}"
    );
    assert_eq!(
        payment["destinationPolicy"], "production/payment",
        "{dump:#}"
    );
    let inventory = services
        .iter()
        .find(|s| s["name"] == "production/inventory");
    assert!(inventory.is_none_or(|s| s["fronted"] == false), "{dump:#}");
    let certs = dump["certificates"].as_array().unwrap();
    assert!(
        certs.iter().any(
            |c| c["identity"] == "spiffe://cluster.local/ns/production/sa/waypoint"
                && !c["notAfter"].is_null()
        ),
        "{dump:#}"
    );
    let metrics: SocketAddr = dump["listeners"]["metrics"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (status, _) = get(metrics, "/metrics").await.unwrap();
    assert_eq!(status, StatusCode::OK);

    // HBONE with the certificate the controller issued: the fronted VIP is accepted,
    // a service without this waypoint is refused.
    let hbone: SocketAddr = dump["listeners"]["hbone"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let checkout = SpiffeId::new(&td, "production", "checkout").unwrap();
    let key = WorkloadKey::generate().unwrap();
    let issued = ca
        .sign_csr(
            &key.csr_pem(&checkout).unwrap(),
            &checkout,
            Duration::from_secs(600),
        )
        .unwrap();
    let store = Arc::new(CertStore::new(Arc::new(ca.trust_bundle().clone())));
    store.insert(Arc::new(
        WorkloadCertificate::new(key, &issued.chain_pem, &checkout).unwrap(),
    ));
    let client = Pool::new(PoolConfig::default(), store);
    let waypoint_id = SpiffeId::new(&td, "production", "waypoint").unwrap();
    let connect = |target: &str| {
        ConnectRequest::new(
            checkout.clone(),
            waypoint_id.clone(),
            hbone,
            target.parse().unwrap(),
        )
    };
    let accepted = client.connect(connect("10.96.0.11:80")).await;
    assert!(
        accepted.is_ok(),
        "{accepted:?}\n{}",
        both(&controller, &waypoint)
    );
    let refused = client.connect(connect("10.96.0.12:80")).await.unwrap_err();
    assert_eq!(refused.status(), Some(StatusCode::BAD_REQUEST), "{refused}");
    drop(accepted);

    // SIGTERM: drains and exits cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(waypoint.child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let child = &mut waypoint.child;
    let exited = eventually_async("the waypoint exits", DEADLINE, POLL, || {
        let status = child.try_wait();
        async move {
            match status? {
                Some(s) => Ok(s),
                None => anyhow::bail!("still running"),
            }
        }
    })
    .await;
    let exited = exited.unwrap_or_else(|e| panic!("{e:?}\n{}", both(&controller, &waypoint)));
    assert!(
        exited.success(),
        "{exited}\n{}",
        both(&controller, &waypoint)
    );
}
