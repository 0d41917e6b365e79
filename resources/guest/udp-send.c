/* udp-send ADDR PORT MESSAGE: sends MESSAGE as one UDP datagram to
 * ADDR:PORT. The Linux guest's root file system has it because busybox's
 * nc has no UDP mode; the tests use it to send a datagram through
 * virtio-net. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: udp-send ADDR PORT MESSAGE\n");
        return 2;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) {
        fprintf(stderr, "udp-send: bad address %s\n", argv[1]);
        return 2;
    }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) {
        perror("udp-send: socket");
        return 1;
    }
    size_t len = strlen(argv[3]);
    if (sendto(s, argv[3], len, 0, (struct sockaddr *)&to, sizeof to) != (ssize_t)len) {
        perror("udp-send: sendto");
        return 1;
    }
    close(s);
    return 0;
}
