//! TLS to PostgreSQL (`sslmode`, `sslrootcert`) on both the ordinary and the
//! replication connection, against a server that refuses plaintext for the relay's role.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outbox_relay::testkit::postgres::Postgres;
use outbox_relay::testkit::tansu::Tansu;

use crate::support::{insert_event, load_toml, run_error, RunningRelay};

/// A CA and a server certificate for localhost / 127.0.0.1, made with openssl.
pub fn make_certs(dir: &Path, ca_name: &str) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        &format!("/CN={ca_name}"),
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext",
    ]);
}

/// Hands the directory and the key to the server's user, as PostgreSQL insists.
fn give_to_server_user(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    if nix::unistd::geteuid().is_root() {
        let pg = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        for p in [
            dir.to_path_buf(),
            dir.join("server.key"),
            dir.join("server.crt"),
        ] {
            nix::unistd::chown(&p, Some(pg.uid), Some(pg.gid)).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_require_and_refused_plaintext() {
    crate::support::init_logs();
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path(), "outbox-test-ca");
    let other_ca = tempfile::tempdir().unwrap();
    make_certs(other_ca.path(), "someone-else");
    give_to_server_user(certs.path());
    let cert = certs.path().join("server.crt");
    let key = certs.path().join("server.key");
    let pg = Postgres::start_with(&[
        "ssl=on",
        &format!("ssl_cert_file={}", cert.display()),
        &format!("ssl_key_file={}", key.display()),
    ])
    .unwrap();
    let kafka = Tansu::start().unwrap();
    outbox_relay::testkit::kafka::create_topics(&kafka.brokers(), &["outbox.order"], 1)
        .await
        .unwrap();
    pg.create_database("app").await.unwrap();
    let db = pg.connect("app").await.unwrap();
    for (_, sql) in outbox_relay::SETUP_SQL {
        db.batch_execute(sql).await.unwrap();
    }
    db.batch_execute("CREATE ROLE tls_user LOGIN REPLICATION PASSWORD 'tls-pw'; GRANT SELECT, DELETE ON outbox TO tls_user; GRANT INSERT ON outbox_relay_dead_letter TO tls_user; GRANT SELECT, INSERT, UPDATE ON outbox_relay_schema, outbox_relay_slots TO tls_user; GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_relay_dlq, outbox_relay_requests, outbox_relay_control TO tls_user")
        .await
        .unwrap();
    let hba = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("hostssl all tls_user 127.0.0.1/32 scram-sha-256\nhostnossl all tls_user 127.0.0.1/32 reject\n{old}"),
    )
    .unwrap();
    db.execute("SELECT pg_reload_conf()", &[]).await.unwrap();

    let port = pg.port();
    let config = |mode: &str, params: &str| {
        load_toml(&format!(
            "[source]\nmode = \"{mode}\"\ndatabase_url = \"postgres://tls_user:tls-pw@localhost:{port}/app?{params}\"\n\
             [source.logical]\nstatus_interval = \"1s\"\nheartbeat_interval = \"0s\"\n\
             [source.polling]\ninterval = \"20ms\"\n\
             [sink.kafka]\nbrokers = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
            kafka.brokers()
        ))
    };
    let ca = certs.path().join("ca.pem");

    // Log mode, verified. pg_hba.conf refuses this role without TLS, so the SQL and the
    // replication connection both speak TLS.
    let relay = RunningRelay::start(config(
        "logical",
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    ));
    for _ in 0..100 {
        if db
            // The relay's slot only: a first start's temporary slot may still be active.
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE active AND slot_name = 'outbox_relay'",
                &[],
            )
            .await
            .unwrap()
            .is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    insert_event(&db, "order", "o-1", "OverTls", "{}").await;
    let got = tokio::task::spawn_blocking({
        let brokers = kafka.brokers();
        move || {
            outbox_relay::testkit::kafka::read_all(
                &brokers,
                &["outbox.order"],
                1,
                Duration::from_secs(20),
            )
        }
    })
    .await
    .unwrap()
    .unwrap();
    relay.stop().await;
    assert_eq!(got.len(), 1, "relayed over TLS");

    // Polling with sslmode=require: encrypted, certificate not checked.
    let relay = RunningRelay::start(config("polling", "sslmode=require"));
    for _ in 0..100 {
        let left: i64 = db
            .query_one("SELECT count(*) FROM outbox", &[])
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await;
    assert_eq!(
        db.query_one("SELECT count(*) FROM outbox", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        0,
        "the polling relay connected over TLS and deleted the delivered row"
    );

    // A certificate from another CA is refused under verify-full.
    let e = run_error(config(
        "logical",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            other_ca.path().join("ca.pem").display()
        ),
    ))
    .await;
    assert!(
        e.to_lowercase().contains("certificate") || e.contains("UnknownIssuer"),
        "{e}"
    );

    // Plaintext is refused by this server for this role.
    let e = run_error(config("logical", "sslmode=disable")).await;
    assert!(
        e.contains("pg_hba.conf rejects") || e.contains("28000"),
        "{e}"
    );
}
