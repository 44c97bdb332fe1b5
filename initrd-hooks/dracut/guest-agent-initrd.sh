#!/bin/sh
# Run by guest-agent.service in the initrd: `guest-agent mount-all --root
# /sysroot`, then apply the failure policy.
#
# Policy (kernel command line, else /etc/guest-agent/initrd.conf, else continue):
#   rd.guest_agent.onfail=continue  report the failure (this unit fails, on the
#                                   console) and boot on
#   rd.guest_agent.onfail=shell     start emergency.target: dracut's emergency
#                                   shell, or with rd.shell=0 the action of
#                                   rd.emergency=reboot|poweroff|halt
# guest_agent.onfail= (without rd.) is accepted too.

GUEST_AGENT_ONFAIL=continue
GUEST_AGENT_ARGS=
[ -r /etc/guest-agent/initrd.conf ] && . /etc/guest-agent/initrd.conf

for x in $(cat /proc/cmdline); do
    case "$x" in
    rd.guest_agent.onfail=* | guest_agent.onfail=* | rd.guest-agent.onfail=* | guest-agent.onfail=*)
        GUEST_AGENT_ONFAIL=${x#*=} ;;
    esac
done

mkdir -p /run/guest-agent && : > /run/guest-agent/initrd-ran

# The cheapest start that works (bench/startup_guest.py): isolated (-I: no PYTHON*
# variables, no user site, no cwd on sys.path), the entry point imported directly
# (`-m` goes through runpy, ~60 ms more in an emulated guest); the .pyc files were
# compiled when the image was built, so nothing is written at boot.
# shellcheck disable=SC2086 # GUEST_AGENT_ARGS is a list of words
/usr/bin/python3 -I -c 'from guest_agent.main import run; run()' mount-all --root /sysroot $GUEST_AGENT_ARGS
rc=$?
[ "$rc" -eq 0 ] && exit 0

case "$GUEST_AGENT_ONFAIL" in
shell | emergency)
    echo "guest-agent: a required mount failed (exit status $rc, see above); rd.guest_agent.onfail=shell: starting emergency.target" > /dev/console
    systemctl --no-block --job-mode=replace-irreversibly start emergency.target
    ;;
*)
    echo "guest-agent: a required mount failed (exit status $rc, see above); continuing the boot (rd.guest_agent.onfail=continue)" > /dev/console
    ;;
esac
exit "$rc"
