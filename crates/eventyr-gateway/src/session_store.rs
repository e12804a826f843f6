//! Where sessions live: [`SqliteSessions`] (one gateway: embedded mode) and
//! [`RedisSessions`] (several gateways: distributed mode), both behind
//! [`SessionStore`](crate::session::SessionStore).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::session::{Rotation, SessionError, SessionStore, StoredSession};
use crate::shared::SharedRedis;

fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Sessions in a SQLite file: one connection writes (each change synced before it is
/// answered: a logout must survive a crash), another reads (WAL: reads never wait for
/// a write).
pub struct SqliteSessions {
    writer: Arc<Mutex<rusqlite::Connection>>,
    reader: Mutex<rusqlite::Connection>,
}

impl SqliteSessions {
    pub fn open(path: &Path) -> Result<Self, String> {
        let fail = |e: rusqlite::Error| format!("sessions.store: {}: {e}", path.display());
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("sessions.store: {}: {e}", parent.display()))?;
        }
        let writer = rusqlite::Connection::open(path).map_err(fail)?;
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA busy_timeout = 5000;
                 CREATE TABLE IF NOT EXISTS sessions (
                     id TEXT PRIMARY KEY,
                     user TEXT NOT NULL,
                     refresh_id TEXT NOT NULL,
                     expires_ms INTEGER NOT NULL
                 );
                 CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user);",
            )
            .map_err(fail)?;
        // The replaced refresh id and when (the grace of a replay): added to files of
        // earlier versions.
        let columns: Vec<String> = writer
            .prepare("SELECT name FROM pragma_table_info('sessions')")
            .and_then(|mut s| s.query_map([], |row| row.get(0))?.collect())
            .map_err(fail)?;
        if !columns.iter().any(|c| c == "previous_refresh_id") {
            writer
                .execute_batch(
                    "ALTER TABLE sessions ADD COLUMN previous_refresh_id TEXT;
                     ALTER TABLE sessions ADD COLUMN rotated_at INTEGER NOT NULL DEFAULT 0;",
                )
                .map_err(fail)?;
        }
        let reader = rusqlite::Connection::open(path).map_err(fail)?;
        reader
            .execute_batch("PRAGMA busy_timeout = 5000;")
            .map_err(fail)?;
        Ok(Self {
            writer: Arc::new(Mutex::new(writer)),
            reader: Mutex::new(reader),
        })
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, SessionError> {
        let writer = Arc::clone(&self.writer);
        tokio::task::spawn_blocking(move || {
            let connection = writer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&connection)
        })
        .await
        .map_err(|e| SessionError::Unavailable(e.to_string()))?
        .map_err(|e| SessionError::Unavailable(e.to_string()))
    }
}

#[async_trait::async_trait]
impl SessionStore for SqliteSessions {
    async fn create(&self, session: &StoredSession) -> Result<(), SessionError> {
        let session = session.clone();
        self.write(move |c| {
            let now = unix_ms(SystemTime::now());
            // Expired sessions go as new ones come.
            c.execute("DELETE FROM sessions WHERE expires_ms < ?1", [now])?;
            c.execute(
                "INSERT INTO sessions (id, user, refresh_id, expires_ms) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![
                    session.id,
                    session.user,
                    session.refresh_id,
                    unix_ms(session.expires)
                ],
            )
            .map(drop)
        })
        .await
    }

    async fn is_active(&self, id: &str) -> Result<bool, SessionError> {
        // A primary-key lookup: microseconds, on the request's thread.
        let reader = self
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        reader
            .prepare_cached("SELECT 1 FROM sessions WHERE id = ?1 AND expires_ms > ?2")
            .and_then(|mut s| s.exists(rusqlite::params![id, unix_ms(SystemTime::now())]))
            .map_err(|e| SessionError::Unavailable(e.to_string()))
    }

    async fn rotate(
        &self,
        id: &str,
        expected: &str,
        next: &str,
        expires: SystemTime,
        issued: u64,
    ) -> Result<Rotation, SessionError> {
        use rusqlite::OptionalExtension;
        let (id, expected, next) = (id.to_owned(), expected.to_owned(), next.to_owned());
        self.write(move |c| {
            let now = unix_ms(SystemTime::now());
            let changed = c.execute(
                "UPDATE sessions SET previous_refresh_id = refresh_id, refresh_id = ?3,
                     rotated_at = ?6, expires_ms = ?4
                 WHERE id = ?1 AND refresh_id = ?2 AND expires_ms > ?5",
                rusqlite::params![
                    id,
                    expected,
                    next,
                    unix_ms(expires),
                    now,
                    i64::try_from(issued).unwrap_or(i64::MAX)
                ],
            )?;
            if changed == 1 {
                return Ok(Rotation::Rotated);
            }
            let found: Option<(String, Option<String>, i64)> = c
                .prepare_cached(
                    "SELECT refresh_id, previous_refresh_id, rotated_at FROM sessions
                     WHERE id = ?1 AND expires_ms > ?2",
                )?
                .query_row(rusqlite::params![id, now], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .optional()?;
            Ok(match found {
                None => Rotation::Gone,
                Some((current, Some(previous), rotated_at)) if previous == expected => {
                    Rotation::Replayed {
                        current,
                        rotated_at: u64::try_from(rotated_at).unwrap_or(0),
                    }
                }
                Some(_) => Rotation::Mismatch,
            })
        })
        .await
    }

    async fn revoke(&self, id: &str) -> Result<(), SessionError> {
        let id = id.to_owned();
        self.write(move |c| {
            c.execute("DELETE FROM sessions WHERE id = ?1", [id])
                .map(drop)
        })
        .await
    }

    async fn revoke_user(&self, user: &str) -> Result<u64, SessionError> {
        let user = user.to_owned();
        self.write(move |c| {
            c.execute("DELETE FROM sessions WHERE user = ?1", [user])
                .map(|n| n as u64)
        })
        .await
    }
}

/// Sessions in Redis: `eventyr:session:{id}` (a hash of the user and the current
/// refresh id, expiring with the session) and `eventyr:user-sessions:{user}` (the
/// set of a user's session ids, for revoking them all without `KEYS`). Rotation and
/// revocations are Lua scripts: atomic, whichever gateway runs them.
pub struct RedisSessions {
    redis: SharedRedis,
    /// Made once: each holds its script's SHA-1 for EVALSHA.
    rotate: redis::Script,
    revoke: redis::Script,
    revoke_user: redis::Script,
}

const ROTATE: &str = r"
local current = redis.call('HGET', KEYS[1], 'refresh')
if not current then return {-1, '', '0'} end
if current == ARGV[1] then
  redis.call('HSET', KEYS[1], 'refresh', ARGV[2], 'previous', ARGV[1], 'rotated', ARGV[4])
  redis.call('PEXPIREAT', KEYS[1], ARGV[3])
  return {1, '', '0'}
end
if redis.call('HGET', KEYS[1], 'previous') == ARGV[1] then
  return {2, current, redis.call('HGET', KEYS[1], 'rotated') or '0'}
end
return {0, '', '0'}";

const REVOKE: &str = r"
local user = redis.call('HGET', KEYS[1], 'user')
redis.call('DEL', KEYS[1])
if user then redis.call('SREM', ARGV[1] .. user, ARGV[2]) end
return 1";

const REVOKE_USER: &str = r"
local ids = redis.call('SMEMBERS', KEYS[1])
local gone = 0
for _, id in ipairs(ids) do gone = gone + redis.call('DEL', ARGV[1] .. id) end
redis.call('DEL', KEYS[1])
return gone";

const SESSION_PREFIX: &str = "eventyr:session:";
const USER_PREFIX: &str = "eventyr:user-sessions:";

impl RedisSessions {
    pub fn new(redis: SharedRedis) -> Self {
        Self {
            redis,
            rotate: redis::Script::new(ROTATE),
            revoke: redis::Script::new(REVOKE),
            revoke_user: redis::Script::new(REVOKE_USER),
        }
    }
}

fn unavailable(e: redis::RedisError) -> SessionError {
    SessionError::Unavailable(e.to_string())
}

#[async_trait::async_trait]
impl SessionStore for RedisSessions {
    async fn create(&self, session: &StoredSession) -> Result<(), SessionError> {
        let mut connection = self.redis.connection().map_err(unavailable)?;
        let key = format!("{SESSION_PREFIX}{}", session.id);
        let user_key = format!("{USER_PREFIX}{}", session.user);
        let expires = unix_ms(session.expires);
        redis::pipe()
            .atomic()
            .hset_multiple(
                &key,
                &[
                    ("user", session.user.as_str()),
                    ("refresh", session.refresh_id.as_str()),
                ],
            )
            .pexpire_at(&key, expires)
            .sadd(&user_key, &session.id)
            .pexpire_at(&user_key, expires)
            .exec_async(&mut connection)
            .await
            .map_err(unavailable)
    }

    async fn is_active(&self, id: &str) -> Result<bool, SessionError> {
        let mut connection = self.redis.connection().map_err(unavailable)?;
        redis::cmd("EXISTS")
            .arg(format!("{SESSION_PREFIX}{id}"))
            .query_async::<bool>(&mut connection)
            .await
            .map_err(unavailable)
    }

    async fn rotate(
        &self,
        id: &str,
        expected: &str,
        next: &str,
        expires: SystemTime,
        issued: u64,
    ) -> Result<Rotation, SessionError> {
        let mut connection = self.redis.connection().map_err(unavailable)?;
        let (outcome, current, rotated_at): (i64, String, String) = self
            .rotate
            .key(format!("{SESSION_PREFIX}{id}"))
            .arg(expected)
            .arg(next)
            .arg(unix_ms(expires))
            .arg(issued)
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        if outcome == 1 {
            // The user's set lives at least as long as the session.
            let user_key: Option<String> = redis::cmd("HGET")
                .arg(format!("{SESSION_PREFIX}{id}"))
                .arg("user")
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            if let Some(user) = user_key {
                let _: () = redis::cmd("PEXPIREAT")
                    .arg(format!("{USER_PREFIX}{user}"))
                    .arg(unix_ms(expires))
                    .arg("GT")
                    .query_async(&mut connection)
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(match outcome {
            1 => Rotation::Rotated,
            2 => Rotation::Replayed {
                current,
                rotated_at: rotated_at.parse().unwrap_or(0),
            },
            0 => Rotation::Mismatch,
            _ => Rotation::Gone,
        })
    }

    async fn revoke(&self, id: &str) -> Result<(), SessionError> {
        let mut connection = self.redis.connection().map_err(unavailable)?;
        self.revoke
            .key(format!("{SESSION_PREFIX}{id}"))
            .arg(USER_PREFIX)
            .arg(id)
            .invoke_async::<i64>(&mut connection)
            .await
            .map(drop)
            .map_err(unavailable)
    }

    async fn revoke_user(&self, user: &str) -> Result<u64, SessionError> {
        let mut connection = self.redis.connection().map_err(unavailable)?;
        self.revoke_user
            .key(format!("{USER_PREFIX}{user}"))
            .arg(SESSION_PREFIX)
            .invoke_async::<u64>(&mut connection)
            .await
            .map_err(unavailable)
    }
}
