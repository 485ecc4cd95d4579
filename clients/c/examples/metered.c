/*
 * metered: a C program that sells by use, through libmeter.
 *
 *     cc -pthread -I clients/c/include clients/c/examples/metered.c \
 *        -L target/release -lmeter -o metered
 *     LD_LIBRARY_PATH=target/release ./metered SOCKET CID PID THREADS USES
 *
 * Each of THREADS threads takes a handle of its own, names its own context,
 * logs in customer CID, and makes USES uses of product PID: query, the
 * work, commit. Then the meter is asked to upload (flush). Exits 0 when
 * every use was committed, 1 when the meter said no to a use, 2 when a
 * call failed (the reason on stderr).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "meter.h"

struct job {
    const char *socket, *cid, *pid;
    int index, uses, committed, status;
};

static int fail(meter *m, const char *call) {
    fprintf(stderr, "metered: %s: %s (status %d, fault %d)\n", call,
            meter_last_error(m), meter_last_status(m), meter_fault_code(m));
    return 2;
}

static void *work(void *argument) {
    struct job *job = argument;
    char context[32];
    meter *m = meter_connect(job->socket);
    if (m == NULL) {
        job->status = 2;
        return NULL;
    }
    snprintf(context, sizeof context, "thread:%d", job->index);
    if (meter_set_context(m, context) != METER_OK) {
        job->status = fail(m, "set_context");
    } else if (meter_login(m, job->cid) != METER_OK) {
        job->status = fail(m, "login");
    } else {
        for (int n = 0; n < job->uses && job->status == 0; n++) {
            if (meter_query(m, job->pid) != 1) {
                /* Fail closed: no answer is a no. */
                job->status = meter_last_status(m) == METER_OK ? 1 : fail(m, "query");
                break;
            }
            /* ... the metered work ... */
            if (meter_commit(m, job->pid) != METER_OK) {
                job->status = fail(m, "commit");
                break;
            }
            job->committed++;
        }
        if (meter_logout(m, job->cid) < 0 && job->status == 0)
            job->status = fail(m, "logout");
    }
    meter_free(m);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: metered SOCKET CID PID THREADS USES\n");
        return 2;
    }
    int threads = atoi(argv[4]), uses = atoi(argv[5]);
    if (threads < 1 || threads > 64 || uses < 0) {
        fprintf(stderr, "metered: THREADS is 1 to 64, USES at least 0\n");
        return 2;
    }
    struct job jobs[64];
    pthread_t ids[64];
    for (int i = 0; i < threads; i++) {
        jobs[i] = (struct job){argv[1], argv[2], argv[3], i, uses, 0, 0};
        if (pthread_create(&ids[i], NULL, work, &jobs[i]) != 0) {
            fprintf(stderr, "metered: could not start a thread\n");
            return 2;
        }
    }
    int status = 0, committed = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(ids[i], NULL);
        committed += jobs[i].committed;
        if (jobs[i].status > status)
            status = jobs[i].status;
    }
    meter *m = meter_connect(argv[1]);
    int uploaded = meter_flush(m);
    if (uploaded < 0 && status == 0)
        status = fail(m, "flush");
    meter_free(m);
    printf("committed %d uses, uploaded: %s\n", committed, uploaded == 1 ? "yes" : "no");
    return status;
}
