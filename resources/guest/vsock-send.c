/* vsock-send PORT MESSAGE: connects to the host (CID 2) on vsock port
 * PORT, sends MESSAGE and a newline, reads one line back and prints
 * `vsock-send: got <line>`. The Linux guest's root file system has it
 * because busybox has no vsock client; the tests use it to talk to a host
 * listener at flatlet's `<uds_path>_<PORT>`. Gives up after 30 s. */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: vsock-send PORT MESSAGE\n");
        return 2;
    }
    alarm(30);
    struct sockaddr_vm to = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST,
                             .svm_port = (unsigned)strtoul(argv[1], NULL, 10)};
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0) {
        perror("vsock-send: socket");
        return 1;
    }
    if (connect(s, (struct sockaddr *)&to, sizeof to) != 0) {
        perror("vsock-send: connect");
        return 1;
    }
    size_t len = strlen(argv[2]);
    if (write(s, argv[2], len) != (ssize_t)len || write(s, "\n", 1) != 1) {
        perror("vsock-send: write");
        return 1;
    }
    char line[256];
    size_t n = 0;
    while (n + 1 < sizeof line) {
        ssize_t r = read(s, line + n, 1);
        if (r <= 0 || line[n] == '\n')
            break;
        n++;
    }
    line[n] = 0;
    printf("vsock-send: got %s\n", line);
    close(s);
    return n > 0 ? 0 : 1;
}
