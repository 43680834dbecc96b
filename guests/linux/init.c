/*
 * /init of pykvm's small Linux guest: the first user process, PID 1.
 *
 * It mounts /proc, /sys and /dev, prints the marker the tests and benchmarks wait for, starts a
 * busybox shell on the serial console in a session of its own, reaps every orphan while the shell
 * runs, and powers the guest off (after sync) when the shell exits.
 *
 * Why a program and not a shell script: on this host's KVM backend (kvm_pvm) the guest kernel is
 * emulated, and every process a script starts costs the kernel a fork, an exec and the page faults
 * that follow, about 0.2 s each. The script this replaces ran four busybox processes before its
 * shell (sh itself and three mounts, ~1.9 s of a ~16 s boot); this program makes the same system
 * calls from one process. See README.md, "The initramfs".
 *
 * Freestanding: no libc, so the binary is a few kilobytes of the initramfs (each kilobyte there
 * costs emulated time to unpack). System calls use the x86-64 convention (number in rax, arguments
 * in rdi, rsi, rdx, r10, r8; rcx and r11 clobbered); a negative return is -errno.
 *
 * Build: see the Makefile's $(OUT)/init rule.
 */

#define SYS_write	1
#define SYS_pause	34
#define SYS_fork	57
#define SYS_execve	59
#define SYS_exit	60
#define SYS_wait4	61
#define SYS_setsid	112
#define SYS_sync	162
#define SYS_mount	165
#define SYS_reboot	169

#define ECHILD		10

/* reboot(2): the two magic numbers and LINUX_REBOOT_CMD_POWER_OFF (include/uapi/linux/reboot.h).
 * Without ACPI the kernel cannot power off and halts instead, which pykvm ends as status 0. */
#define REBOOT_MAGIC1		0xfee1deadL
#define REBOOT_MAGIC2		672274793L
#define REBOOT_POWER_OFF	0x4321fedcL

#define BUSYBOX		"/bin/busybox"
#define MARKER		"pykvm-linux: init ready\n"
#define MAX_ENV		64

static long syscall5(long nr, long a, long b, long c, long d, long e)
{
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	long ret;

	__asm__ volatile ("syscall"
			  : "=a"(ret)
			  : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
			  : "rcx", "r11", "memory");
	return ret;
}

#define syscall3(nr, a, b, c)	syscall5(nr, (long)(a), (long)(b), (long)(c), 0, 0)

static unsigned long length(const char *s)
{
	unsigned long n = 0;

	while (s[n])
		n++;
	return n;
}

static void say(const char *s)
{
	syscall3(SYS_write, 1, s, length(s));
}

/* "error N" for a failed call: no strerror without libc; errno numbers are in errno-base.h. */
static void say_error(const char *what, long err)
{
	char digits[24];
	int i = sizeof(digits) - 1;
	unsigned long n = (unsigned long)-err;

	digits[i] = 0;
	do {
		digits[--i] = (char)('0' + n % 10);
		n /= 10;
	} while (n && i > 0);
	say("pykvm-linux: ");
	say(what);
	say(" failed: error ");
	say(digits + i);
	say("\n");
}

static int starts_with(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

static void mount_fs(const char *source, const char *target, const char *type, const char *what)
{
	long err = syscall5(SYS_mount, (long)source, (long)target, (long)type, 0, 0);

	/* Carry on without it, as the shell would: a shell is still more use than a panic. */
	if (err < 0)
		say_error(what, err);
}

static char *env[MAX_ENV + 3];

/*
 * The shell's environment: PATH and HOME for a shell user, then what the kernel gave init (TERM=linux
 * and any NAME=value on the command line that the kernel did not know) but its own PATH and HOME.
 */
static void build_env(char **kernel_env)
{
	int n = 0;

	env[n++] = "PATH=/bin:/sbin:/usr/bin:/usr/sbin";
	env[n++] = "HOME=/root";
	for (; *kernel_env && n < MAX_ENV + 2; kernel_env++)
		if (!starts_with(*kernel_env, "PATH=") && !starts_with(*kernel_env, "HOME="))
			env[n++] = *kernel_env;
	env[n] = 0;
}

static void shell(void)
{
	/* cttyhack opens the console's real tty (ttyS0) so that it becomes the shell's controlling
	 * terminal (job control, Ctrl-C); busybox runs its applets by argv[0] without links. */
	static char *const cttyhack_sh[] = { "cttyhack", "sh", 0 };
	static char *const sh[] = { "sh", 0 };
	long err = syscall3(SYS_setsid, 0, 0, 0);

	if (err < 0)
		say_error("setsid", err);
	err = syscall3(SYS_execve, BUSYBOX, cttyhack_sh, env);
	say_error("exec " BUSYBOX " cttyhack sh", err);
	err = syscall3(SYS_execve, BUSYBOX, sh, env);
	say_error("exec " BUSYBOX " sh", err);
	syscall3(SYS_exit, 127, 0, 0);
}

/* Called from _start with the initial stack: argc, argv[argc], 0, envp..., 0 (x86-64 psABI 3.4.1). */
void init_main(long *stack)
{
	char **argv = (char **)(stack + 1);
	long pid, w;

	build_env(argv + stack[0] + 1);
	mount_fs("proc", "/proc", "proc", "mount proc on /proc");
	mount_fs("sysfs", "/sys", "sysfs", "mount sysfs on /sys");
	/* CONFIG_DEVTMPFS_MOUNT does not apply to an initramfs root: mount it over the archive's nodes. */
	mount_fs("devtmpfs", "/dev", "devtmpfs", "mount devtmpfs on /dev");
	say(MARKER);

	pid = syscall3(SYS_fork, 0, 0, 0);
	if (pid == 0)
		shell();
	if (pid < 0) {
		say_error("fork", pid);
	} else {
		/* PID 1 inherits every orphan: reap them all until the shell itself ends. */
		do {
			w = syscall5(SYS_wait4, -1, 0, 0, 0, 0);
		} while (w != pid && w != -ECHILD);
		say("pykvm-linux: shell exited, powering off\n");
	}
	syscall3(SYS_sync, 0, 0, 0);
	w = syscall5(SYS_reboot, REBOOT_MAGIC1, REBOOT_MAGIC2, REBOOT_POWER_OFF, 0, 0);
	say_error("power off", w);
	/* PID 1 must not exit (the kernel would panic): wait here for good. */
	for (;;)
		syscall3(SYS_pause, 0, 0, 0);
}

__asm__(".text\n"
	".globl _start\n"
	"_start:\n"
	"	xor %ebp, %ebp\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call init_main\n"
	"	hlt\n");
