/*
 * cgvm-exit STATUS: end the run with exit status STATUS (0..255) by writing it as one byte to
 * cgvm's exit device, I/O port 0xf4.
 *
 * The guest's /init uses it when the kernel has no /dev/port (Debian's kernels are built without
 * CONFIG_DEVPORT). It needs CAP_SYS_RAWIO for ioperm(2); /init runs as root.
 *
 * Freestanding: no libc, no headers. Built by build.sh with
 *   cc -static -nostdlib -Os ... -o cgvm-exit cgvm-exit.c
 * Exit statuses when it returns at all: 1 bad usage or ioperm failed, 2 the write did not end the
 * run (no exit device at port 0xf4).
 */

#define SYS_WRITE 1
#define SYS_EXIT 60
#define SYS_IOPERM 173
#define EXIT_PORT 0xf4

static long syscall3(long nr, long a, long b, long c)
{
	long ret;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return ret;
}

static unsigned long length(const char *s)
{
	unsigned long n = 0;

	while (s[n] != '\0')
		n++;
	return n;
}

static void __attribute__((noreturn)) die(int status, const char *msg)
{
	syscall3(SYS_WRITE, 2, (long)msg, (long)length(msg));
	for (;;)
		syscall3(SYS_EXIT, status, 0, 0);
}

/* Parses a decimal number 0..255; returns -1 when s is not one. */
static int parse_status(const char *s)
{
	int value = 0;

	if (*s == '\0')
		return -1;
	for (; *s != '\0'; s++) {
		if (*s < '0' || *s > '9')
			return -1;
		value = value * 10 + (*s - '0');
		if (value > 255)
			return -1;
	}
	return value;
}

/* Called by _start with the initial stack pointer: argc, then argv[]. */
void __attribute__((noreturn, used)) cgvm_exit_main(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	int status;

	if (argc != 2)
		die(1, "usage: cgvm-exit STATUS (0..255)\n");
	status = parse_status(argv[1]);
	if (status < 0)
		die(1, "cgvm-exit: STATUS must be a number from 0 to 255\n");
	if (syscall3(SYS_IOPERM, EXIT_PORT, 1, 1) != 0)
		die(1, "cgvm-exit: ioperm(0xf4) failed (not root?)\n");
	__asm__ volatile("outb %b0, %w1" : : "a"(status), "Nd"(EXIT_PORT));
	/* cgvm stops the guest on the write above; reaching this means nothing listens there. */
	die(2, "cgvm-exit: the write to port 0xf4 did not end the run (no exit device?)\n");
}

__asm__(".text\n"
	".globl _start\n"
	"_start:\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call cgvm_exit_main\n"
	"	hlt\n");
