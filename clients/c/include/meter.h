/*
 * meter.h: the meter's client library (libmeter) for C and every language
 * that can call C.
 *
 * A program that sells by use links libmeter and talks to the meter daemon
 * (meterd) on this machine with Cox's calls: login, logout, query, commit,
 * cancel, flush. The library speaks the meter's XML-RPC over its Unix
 * socket; nothing else is needed.
 *
 *     meter *m = meter_connect(NULL);          // the default socket
 *     if (meter_query(m, "B1-P7") == 1) {       // may this use begin?
 *         do_the_work();
 *         if (meter_commit(m, "B1-P7") != METER_OK)
 *             fprintf(stderr, "%s\n", meter_last_error(m));
 *     }
 *     meter_free(m);
 *
 * Rules:
 * - meter_query answers 1 only when the meter said yes; 0 when it said no
 *   AND when it could not be asked (no meter, a socket owned by a user the
 *   library does not trust, a bad answer). It fails closed: the use must
 *   not begin. meter_last_status tells the two apart.
 * - The other calls return METER_OK (0), 1 or 0 for a yes/no answer, or a
 *   negative METER_ERR_* code; meter_last_error then says why.
 * - A handle keeps one connection and is for one thread at a time: give
 *   each thread its own (meter_connect is cheap and never fails but for
 *   memory). Handles of one process share its context (who pays) unless
 *   meter_set_context names one per thread.
 * - Strings passed in are NUL-terminated UTF-8 and are copied; strings
 *   returned belong to the handle and stay valid until its next call.
 * - commit returns once the use is durable on the meter's disk.
 */
#ifndef METER_H
#define METER_H

#ifdef __cplusplus
extern "C" {
#endif

/* The call succeeded (or answered "no", for calls that answer yes or no). */
#define METER_OK 0
/* A NULL handle, or a text that is not UTF-8 or not a valid id
 * (a CID is like "B1-C7", a PID like "B1-P7"). Nothing was sent. */
#define METER_ERR_ARGUMENT (-1)
/* No meter answered at the socket (not running, wrong path). */
#define METER_ERR_UNAVAILABLE (-2)
/* The socket belongs to a user this process does not trust to be its
 * meter; nothing was sent. */
#define METER_ERR_UNTRUSTED (-3)
/* The meter answered something that is not a valid answer. */
#define METER_ERR_PROTOCOL (-4)
/* The meter refused the call: meter_fault_code gives its fault code
 * (101 to 109, listed in docs/protocol.md) and meter_last_error its text. */
#define METER_ERR_FAULT (-5)
/* The library failed inside (a bug); the handle may still be used (its
 * connection is made anew). */
#define METER_ERR_INTERNAL (-6)

/* A connection to the meter; opaque. */
typedef struct meter meter;

/* A handle for the meter at socket_path, or at the default path when
 * socket_path is NULL ($METERD_SOCKET, else $XDG_RUNTIME_DIR/meterd.sock,
 * else /run/meterd/meterd.sock). Connects on the first call and again
 * after the meter restarts. NULL only when socket_path is not UTF-8 (when
 * memory runs out the process aborts, as Rust's allocator does). */
meter *meter_connect(const char *socket_path);

/* Closes the connection and frees the handle; NULL is ignored. */
void meter_free(meter *m);

/* Makes this handle's calls in a context of their own named `context`
 * (letters, digits and ".:_-", at most 64 bytes), e.g. one per thread:
 * queries and logins of one context are not seen by another. NULL goes
 * back to the process's context. METER_OK or METER_ERR_ARGUMENT. */
int meter_set_context(meter *m, const char *context);

/* login(CID): this context's uses are charged to the customer cid until
 * logout. METER_OK or an error. */
int meter_login(meter *m, const char *cid);

/* logout(CID): 1 when a login of cid was open, 0 when none was, or an
 * error. */
int meter_logout(meter *m, const char *cid);

/* query(PID): 1 when a use of product pid may begin, else 0 (fail closed:
 * also 0 when the meter could not be asked; see meter_last_status). A
 * query that answered 1 stays open until meter_commit or meter_cancel. */
int meter_query(meter *m, const char *pid);

/* commit(PID): the use happened. Returns METER_OK once it is durable. */
int meter_commit(meter *m, const char *pid);

/* cancel(PID): closes an open query without a use. 1 when one was open,
 * 0 when none was, or an error. */
int meter_cancel(meter *m, const char *pid);

/* flush(): asks the meter to upload now. 1 when the upload succeeded, 0
 * when it did not (the readings stay and are sent later), or an error. */
int meter_flush(meter *m);

/* What the handle's last call ended with: METER_OK or a METER_ERR_* code
 * (for meter_query, the error behind a 0). */
int meter_last_status(const meter *m);

/* The meter's fault code when the last call ended with METER_ERR_FAULT,
 * else 0. */
int meter_fault_code(const meter *m);

/* Why the last call failed, in words; "" after a success. Never NULL. */
const char *meter_last_error(const meter *m);

#ifdef __cplusplus
}
#endif

#endif /* METER_H */
