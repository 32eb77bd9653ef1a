// A UDP flood that batches its system calls, for bench/run.mjs.
//
//   udpflood send <host> <port> <seconds> <size>   sends <size>-byte datagrams for <seconds>
//   udpflood sink <host> <port> <max seconds>      counts what arrives, until 1 s of silence
//
// iperf3 sends one datagram per sendto(), so on a fast host its sender, not the
// path, sets the ceiling: the direct run measures iperf3. Here the sender hands
// the kernel 64 datagrams per sendmmsg() and the sink takes 64 per recvmmsg(),
// so the ends cost little and what is measured is what lies between them.
// Each prints one JSON line on stdout; any failure prints a line on stderr and
// exits 1.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { BATCH = 64, SINK_SLOT = 2048, MAX_SIZE = 1472 };

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int fail(const char *what) {
  fprintf(stderr, "udpflood: %s: %s\n", what, strerror(errno));
  return 1;
}

static int address(const char *host, const char *port, struct sockaddr_in *out) {
  memset(out, 0, sizeof *out);
  out->sin_family = AF_INET;
  out->sin_port = htons((unsigned short)atoi(port));
  return inet_pton(AF_INET, host, &out->sin_addr) == 1 ? 0 : -1;
}

static int send_flood(const char *host, const char *port, double seconds, int size) {
  struct sockaddr_in to;
  if (address(host, port, &to) < 0 || size < 1 || size > MAX_SIZE || seconds <= 0) {
    fprintf(stderr, "udpflood: send wants an IPv4 host, a port, seconds > 0 and a size of 1-%d\n", MAX_SIZE);
    return 2;
  }
  int fd = socket(AF_INET, SOCK_DGRAM, 0);
  if (fd < 0) return fail("socket");
  if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0) return fail("connect");
  static char payload[MAX_SIZE];
  struct iovec iov[BATCH];
  struct mmsghdr msgs[BATCH];
  memset(msgs, 0, sizeof msgs);
  for (int i = 0; i < BATCH; i++) {
    iov[i].iov_base = payload;
    iov[i].iov_len = (size_t)size;
    msgs[i].msg_hdr.msg_iov = &iov[i];
    msgs[i].msg_hdr.msg_iovlen = 1;
  }
  long long sent = 0;
  const double start = now(), end = start + seconds;
  while (now() < end) {
    int n = sendmmsg(fd, msgs, BATCH, 0);
    // A refused datagram (ICMP from an earlier one: nothing listens yet) or a
    // full queue is the flood's business, not an error of the tool.
    if (n > 0) sent += n;
    else if (n < 0 && errno != ECONNREFUSED && errno != ENOBUFS && errno != EAGAIN && errno != EINTR) return fail("sendmmsg");
  }
  printf("{\"sent\":%lld,\"seconds\":%.6f}\n", sent, now() - start);
  return 0;
}

static int sink(const char *host, const char *port, double max_seconds) {
  struct sockaddr_in at;
  if (address(host, port, &at) < 0 || max_seconds <= 0) {
    fprintf(stderr, "udpflood: sink wants an IPv4 host, a port and max seconds > 0\n");
    return 2;
  }
  int fd = socket(AF_INET, SOCK_DGRAM, 0);
  if (fd < 0) return fail("socket");
  int rcvbuf = 4 << 20; // capped by net.core.rmem_max, like iperf3's -w
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  if (bind(fd, (struct sockaddr *)&at, sizeof at) < 0) return fail("bind");
  struct timeval poll_every = {0, 100000};
  if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &poll_every, sizeof poll_every) < 0) return fail("SO_RCVTIMEO");
  static char slots[BATCH][SINK_SLOT];
  struct iovec iov[BATCH];
  struct mmsghdr msgs[BATCH];
  memset(msgs, 0, sizeof msgs);
  for (int i = 0; i < BATCH; i++) {
    iov[i].iov_base = slots[i];
    iov[i].iov_len = SINK_SLOT;
    msgs[i].msg_hdr.msg_iov = &iov[i];
    msgs[i].msg_hdr.msg_iovlen = 1;
  }
  long long received = 0;
  double first = 0, last = 0;
  const double give_up = now() + max_seconds;
  for (;;) {
    double t = now();
    if (t >= give_up || (received > 0 && t - last >= 1.0)) break;
    int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
    if (n > 0) {
      t = now();
      if (received == 0) first = t;
      received += n;
      last = t;
    } else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      return fail("recvmmsg");
    }
  }
  printf("{\"received\":%lld,\"seconds\":%.6f}\n", received, last - first);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 6 && strcmp(argv[1], "send") == 0) return send_flood(argv[2], argv[3], atof(argv[4]), atoi(argv[5]));
  if (argc == 5 && strcmp(argv[1], "sink") == 0) return sink(argv[2], argv[3], atof(argv[4]));
  fprintf(stderr, "usage: udpflood send <host> <port> <seconds> <size> | udpflood sink <host> <port> <max seconds>\n");
  return 2;
}
