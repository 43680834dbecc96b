#!/bin/sh
# /init of pykvm's small Linux guest (guests/linux/mkinitramfs.py puts this file in the initramfs).
# The kernel runs it as PID 1 with /dev/console (console=ttyS0: the serial port) as stdin/out/err.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# CONFIG_DEVTMPFS_MOUNT does not apply to an initramfs root: mount it here (over the archive's few nodes).
mount -t devtmpfs devtmpfs /dev
echo "pykvm-linux: init ready"
# A shell on the console's real tty (cttyhack finds ttyS0), in its own session so that tty is its
# controlling terminal and job control and Ctrl-C work. Busybox's sh runs its applets without symlinks.
setsid cttyhack sh || sh
# The shell ended: do not let PID 1 exit (the kernel would panic); power off instead.
echo "pykvm-linux: shell exited, powering off"
poweroff -f
