//! A private PostgreSQL 15 server per test, for tests that stop or restart
//! the server: the shared local server is used by every other test (and
//! other people) at the same time, so it is never stopped.
//!
//! `initdb` into a temp dir, trust authentication, listening only on a Unix
//! socket in that dir (no TCP port to collide on). As root (CI), the server
//! runs as the `postgres` OS user, since PostgreSQL refuses to run as root.
//! The binaries come from AUDIT_TEST_PG_BIN (default
//! /usr/lib/postgresql/15/bin).

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Command;

use audit_ledger::testing::TestDatabase;

pub struct PrivatePg {
    pub dir: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    /// (uid, gid) to run the server as, when we are root.
    run_as: Option<(u32, u32)>,
}

impl PrivatePg {
    /// initdb and start a server; panics with the reason if it cannot.
    pub fn start() -> Self {
        let bin = PathBuf::from(
            std::env::var("AUDIT_TEST_PG_BIN")
                .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
        );
        let dir = super::scratch_dir().join("pg");
        std::fs::create_dir_all(&dir).expect("private pg dir");
        // SAFETY: geteuid has no preconditions.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(postgres_user())
        } else {
            None
        };
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown private pg dir");
        }
        let pg = Self {
            data: dir.join("data"),
            dir,
            bin,
            run_as,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data.display().to_string(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        // Only a Unix socket, in our own dir; small enough for 2-core CI.
        let conf = format!(
            "\nlisten_addresses = ''\nunix_socket_directories = '{}'\nport = 5432\n\
             max_connections = 200\nshared_buffers = 32MB\nfsync = off\nlog_min_messages = warning\n",
            pg.dir.display()
        );
        let conf_path = pg.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&conf_path, text).expect("write postgresql.conf");
        pg.start_server();
        pg
    }

    /// The URL of database `name` on this server, as its superuser.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://postgres@localhost/{name}?host={}&port=5432",
            self.dir.display()
        )
    }

    /// A fresh, migrated database with a random name.
    pub async fn create_database(&self) -> TestDatabase {
        let name = super::random_name("audit_test").replace('-', "_");
        let url = self.url(&name);
        audit_ledger::store::postgres::create_database_if_missing(&url)
            .await
            .expect("create a database on the private server");
        audit_ledger::store::postgres::migrate(&url)
            .await
            .expect("migrate the private database");
        TestDatabase { name, url }
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start_server(&self) {
        let log = self.dir.join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-l",
                &log,
                "-w",
                "-t",
                "120",
                "start",
            ],
        );
    }

    /// Stops the server: `immediate` is a crash (no checkpoint, every
    /// connection cut, recovery at the next start), `fast` a clean stop.
    pub fn stop_server(&self, mode: &str) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-m",
                mode,
                "-w",
                "-t",
                "120",
                "stop",
            ],
        );
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.current_dir(&self.dir).env_remove("PGDATA");
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid).env("HOME", &self.dir);
        }
        command
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e} (set AUDIT_TEST_PG_BIN to PostgreSQL's bin directory)",
                    self.bin.join(program).display()
                )
            });
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D"])
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

/// The `postgres` OS user's (uid, gid).
fn postgres_user() -> (u32, u32) {
    let name = std::ffi::CString::new("postgres").expect("static name");
    // SAFETY: getpwnam returns null or a pointer into static storage, read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root and there is no `postgres` OS user to run a private PostgreSQL server as"
    );
    // SAFETY: non-null, see above.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}
