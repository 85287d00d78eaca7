#!/usr/bin/env bash
# check.sh — compare this host's kernel settings and process limits with what
# coremq needs for ~1,000,000 connections (tuning/sysctl-coremq.conf,
# tuning/limits-coremq.conf), and optionally apply the sysctls.
# Run with --help for usage. The recommended values below must match
# sysctl-coremq.conf.

set -u

usage() {
    cat <<'EOF'
Usage: check.sh [--apply] [--broker-only] [--pid PID] [--help]

Prints each setting coremq cares about: current value, recommended value,
and OK / LOW / HIGH. Check mode needs no root.

  --apply        as root, set every sysctl that is not OK with `sysctl -w`
                 (runtime only: it never lowers a value that is above a
                 minimum), report each one that fails (e.g. read-only in a
                 container) and carry on, then list what it cannot change
                 from here (process limits). To persist, install
                 sysctl-coremq.conf in /etc/sysctl.d/.
  --broker-only  skip the settings only a load generator on this host needs
                 (marked "loadgen").
  --pid PID      read the open-file and memlock limits of a running process
                 (e.g. $(pidof coremq)) instead of this shell's.
  --help         this text.

Exit status: 0 all OK (or --apply has run; what it could not change is
listed); 1 something is not at its recommendation (LOW or HIGH) in check
mode; 2 usage error (or --apply without root).
EOF
}

apply=0
broker_only=0
pid=""
while [ $# -gt 0 ]; do
    case "$1" in
        --apply) apply=1 ;;
        --broker-only) broker_only=1 ;;
        --pid)
            [ $# -ge 2 ] || { echo "check.sh: --pid needs a process id" >&2; exit 2; }
            pid="$2"
            shift
            ;;
        --pid=*) pid="${1#--pid=}" ;;
        -h | --help) usage; exit 0 ;;
        *) echo "check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "$pid" ]; then
    case "$pid" in
        '' | *[!0-9]*) echo "check.sh: --pid wants one numeric process id, got '$pid'" >&2; exit 2 ;;
    esac
    [ -r "/proc/$pid/limits" ] || { echo "check.sh: no readable /proc/$pid/limits" >&2; exit 2; }
fi
if [ "$apply" -eq 1 ] && [ "$(id -u)" -ne 0 ]; then
    echo "check.sh: --apply needs root (sysctl -w); run check mode without it" >&2
    exit 2
fi

BROKER_PORT=1883
NPROC=$(nproc 2>/dev/null || echo 1)

# key | for | recommended | per-field test (ge: at least, le: at most,
# any: not checked, eq: exactly, "1,2": one of) | label when not met | shown as
SYSCTLS=(
    "fs.file-max|broker|4194304|ge|LOW|>= 4194304"
    "fs.nr_open|broker|2097152|ge|LOW|>= 2097152"
    "net.core.somaxconn|broker|65535|ge|LOW|>= 65535"
    "net.ipv4.tcp_max_syn_backlog|broker|65535|ge|LOW|>= 65535"
    "net.ipv4.tcp_syncookies|broker|1|eq|LOW|1"
    "net.core.netdev_max_backlog|broker|16384|ge|LOW|>= 16384"
    "net.ipv4.tcp_mem|broker|786432 1048576 1572864|ge ge ge|LOW|>= 786432 1048576 1572864"
    "net.ipv4.tcp_rmem|broker|4096 16384 6291456|le le any|HIGH|<= 4096 16384, any max"
    "net.ipv4.tcp_wmem|broker|4096 16384 4194304|le le any|HIGH|<= 4096 16384, any max"
    "net.ipv4.ip_local_port_range|loadgen|10000 65535|le ge|LOW|10000 65535 or wider"
    "net.ipv4.tcp_tw_reuse|loadgen|1|1,2|LOW|1 (2: loopback only)"
    "net.ipv4.tcp_fin_timeout|both|15|le|HIGH|<= 15"
    "net.netfilter.nf_conntrack_max|broker|2097152|ge|LOW|>= 2097152 if loaded"
    "vm.max_map_count|broker|65530|ge|LOW|>= 65530"
)

read_sysctl() { # key → value with single spaces, or nothing
    local f="/proc/sys/${1//.//}"
    [ -r "$f" ] || return 1
    local v
    v=$(tr -s ' \t' '  ' <"$f" 2>/dev/null) || return 1
    printf '%s' "$v"
}

# test_fields CURRENT RECOMMENDED TESTS → 0 when every field passes
test_fields() {
    local -a cur rec tst
    read -r -a cur <<<"$1"
    read -r -a rec <<<"$2"
    read -r -a tst <<<"$3"
    [ "${#cur[@]}" -eq "${#rec[@]}" ] || return 1
    local i
    for i in "${!rec[@]}"; do
        case "${tst[$i]:-${tst[0]}}" in
            ge) [ "${cur[$i]}" -ge "${rec[$i]}" ] || return 1 ;;
            le) [ "${cur[$i]}" -le "${rec[$i]}" ] || return 1 ;;
            eq) [ "${cur[$i]}" -eq "${rec[$i]}" ] || return 1 ;;
            any) ;;
            *) # "a,b": one of
                case ",${tst[$i]}," in *",${cur[$i]},"*) ;; *) return 1 ;; esac ;;
        esac
    done
    return 0
}

# target CURRENT RECOMMENDED TESTS → what --apply writes: the recommendation,
# but a field already beyond it in the right direction is kept.
target() {
    local -a cur rec tst out
    read -r -a cur <<<"$1"
    read -r -a rec <<<"$2"
    read -r -a tst <<<"$3"
    local i
    for i in "${!rec[@]}"; do
        local c="${cur[$i]:-${rec[$i]}}" r="${rec[$i]}"
        case "${tst[$i]:-${tst[0]}}" in
            ge) [ "$c" -gt "$r" ] && out+=("$c") || out+=("$r") ;;
            le) [ "$c" -lt "$r" ] && out+=("$c") || out+=("$r") ;;
            any) out+=("$c") ;;
            *) out+=("$r") ;;
        esac
    done
    printf '%s' "${out[*]}"
}

conntrack_untracked() { # a notrack rule naming the broker port (root only)
    { nft list ruleset 2>/dev/null; iptables-save -t raw 2>/dev/null; } |
        grep -iE "notrack" | grep -q "$BROKER_PORT"
}

fmt='%-30s %-10s %-26s %-26s %s\n'
rows_bad=0
bad_keys=()

print_header() {
    printf "$fmt" SETTING FOR CURRENT RECOMMENDED STATUS
    printf "$fmt" ------------------------------ ---------- -------------------------- -------------------------- ------
}

# check_sysctls: prints one row per sysctl; fills bad_keys, counts rows_bad
check_sysctls() {
    local row key role rec tests label shown cur status note
    bad_keys=()
    for row in "${SYSCTLS[@]}"; do
        IFS='|' read -r key role rec tests label shown <<<"$row"
        note=""
        if ! cur=$(read_sysctl "$key"); then
            cur="(absent)"
            if [ "$key" = net.netfilter.nf_conntrack_max ]; then
                status=OK
                note="  conntrack not loaded"
            else
                status=N/A
                note="  not readable here"
            fi
        elif [ "$broker_only" -eq 1 ] && [ "$role" = loadgen ]; then
            status=skip
        elif test_fields "$cur" "$rec" "$tests"; then
            status=OK
        elif [ "$key" = net.netfilter.nf_conntrack_max ] && conntrack_untracked; then
            status=OK
            note="  port $BROKER_PORT is notrack"
        else
            status=$label
            rows_bad=$((rows_bad + 1))
            bad_keys+=("$key")
        fi
        if [ "$key" = net.netfilter.nf_conntrack_max ] && [ "$cur" != "(absent)" ]; then
            note="$note  (in use: $(read_sysctl net.netfilter.nf_conntrack_count || echo ?))"
        fi
        if [ "$key" = net.ipv4.ip_local_port_range ] && [ "$cur" != "(absent)" ]; then
            local lo hi
            read -r lo hi <<<"$cur"
            note="$note  ($((hi - lo + 1)) ports/source IP)"
            if [ "$lo" -le "$BROKER_PORT" ] && [ "$hi" -ge "$BROKER_PORT" ]; then
                note="$note, includes $BROKER_PORT"
            fi
        fi
        printf "$fmt" "$key" "$role" "$cur" "$shown" "$status$note"
    done
}

# Process limits: this shell's, or --pid's.
limit_of() { # nofile|memlock soft|hard → number (memlock in KiB) or "unlimited"
    local v
    if [ -n "$pid" ]; then
        # "Max open files   SOFT   HARD   files", "Max locked memory  SOFT  HARD  bytes"
        local pattern='^Max open files' field=4
        [ "$1" = memlock ] && pattern='^Max locked memory'
        [ "$2" = hard ] && field=5
        v=$(awk -v f="$field" "/$pattern/ {print \$f}" "/proc/$pid/limits")
        if [ "$1" = memlock ] && [ "$v" != unlimited ]; then v=$((v / 1024)); fi
    else
        case "$1/$2" in
            nofile/soft) v=$(ulimit -Sn) ;;
            nofile/hard) v=$(ulimit -Hn) ;;
            memlock/soft) v=$(ulimit -Sl) ;;
            memlock/hard) v=$(ulimit -Hl) ;;
        esac
    fi
    printf '%s' "$v"
}

NOFILE_REC=1048576
# glommio's minimum is 512 KiB; each shard registers 3 × 64 KiB. One shard per
# core by default, and at least 8 MiB.
MEMLOCK_REC=$((512 + 192 * NPROC))
[ "$MEMLOCK_REC" -lt 8192 ] && MEMLOCK_REC=8192
limits_bad=()

check_limits() {
    local who="shell"
    [ -n "$pid" ] && who="pid $pid"
    limits_bad=()
    local item kind rec v status unit shown
    for item in nofile/soft nofile/hard memlock/soft memlock/hard; do
        kind=${item%/*}
        if [ "$kind" = nofile ]; then rec=$NOFILE_REC; unit=""; else rec=$MEMLOCK_REC; unit=" KiB"; fi
        v=$(limit_of "$kind" "${item#*/}")
        shown="$v$unit"
        [ "$v" = unlimited ] && shown=unlimited
        if [ "$v" = unlimited ] || { [ -n "$v" ] && [ "$v" -ge "$rec" ]; }; then
            status=OK
        else
            status=LOW
            rows_bad=$((rows_bad + 1))
            limits_bad+=("$item")
        fi
        printf "$fmt" "limit $kind ${item#*/}" "$who" "$shown" ">= $rec$unit" "$status"
    done
}

run_checks() {
    rows_bad=0
    print_header
    check_sysctls
    check_limits
}

echo "coremq tuning check: $(uname -sr), $NPROC CPUs, page size $(getconf PAGESIZE) B," \
    "$(awk '/^MemTotal/ {printf "%.1f GiB RAM", $2 / 1048576}' /proc/meminfo)"
echo

if [ "$apply" -eq 0 ]; then
    run_checks
    echo
    if [ "$rows_bad" -eq 0 ]; then
        echo "All settings meet the recommendation."
        exit 0
    fi
    echo "$rows_bad setting(s) not at the recommendation."
    [ "${#bad_keys[@]}" -gt 0 ] &&
        echo "Sysctls: as root, $0 --apply (runtime), or install sysctl-coremq.conf."
    [ "${#limits_bad[@]}" -gt 0 ] &&
        echo "Limits: limits-coremq.conf (logins) or LimitNOFILE=/LimitMEMLOCK= (systemd), then restart."
    exit 1
fi

# ---------------------------------------------------------------- --apply
echo "Before:"
run_checks
echo
echo "Applying (sysctl -w, runtime only):"
applied=()
failed=()
for key in "${bad_keys[@]}"; do
    for row in "${SYSCTLS[@]}"; do
        [ "${row%%|*}" = "$key" ] || continue
        IFS='|' read -r _ _ rec tests _ <<<"$row"
        cur=$(read_sysctl "$key")
        want=$(target "$cur" "$rec" "$tests")
        if err=$(sysctl -w "$key=$want" 2>&1 >/dev/null); then
            now=$(read_sysctl "$key")
            if [ "$now" = "$want" ]; then
                echo "  set     $key = $want   (was $cur)"
                applied+=("$key")
            else
                echo "  FAILED  $key = $want: accepted but reads back '$now'"
                failed+=("$key")
            fi
        else
            echo "  FAILED  $key = $want: ${err:-sysctl -w failed}"
            failed+=("$key")
        fi
    done
done
[ "${#bad_keys[@]}" -eq 0 ] && echo "  nothing to change: every sysctl is OK"

echo
echo "After:"
run_checks
echo
echo "Summary: ${#applied[@]} sysctl(s) set, ${#failed[@]} failed${failed:+: ${failed[*]}}."
if [ "${#limits_bad[@]}" -gt 0 ] || [ "${#failed[@]}" -gt 0 ]; then
    echo "Not changed from here:"
    for key in "${failed[@]}"; do
        echo "  $key: the kernel refused it here (read-only /proc/sys, or a setting"
        echo "      outside this network namespace); set it on the host."
    done
    for item in "${limits_bad[@]}"; do
        case "$item" in
            nofile/hard | memlock/hard)
                echo "  ${item%/*} hard limit: raising it needs CAP_SYS_RESOURCE; set it in"
                echo "      /etc/security/limits.d/ (tuning/limits-coremq.conf) and log in again,"
                echo "      or LimitNOFILE=/LimitMEMLOCK= in the systemd unit (tuning/coremq.service)." ;;
            nofile/soft)
                echo "  nofile soft limit: cannot exceed the hard limit; up to it, 'ulimit -Sn"
                echo "      \$(ulimit -Hn)' in the shell that starts loadgen (coremq raises its own)." ;;
            memlock/soft)
                echo "  memlock soft limit: cannot exceed the hard limit; up to it,"
                echo "      'ulimit -Sl \$(ulimit -Hl)' before starting coremq." ;;
        esac
    done
fi
echo "Runtime only: to keep the sysctls after a reboot, install"
echo "  tuning/sysctl-coremq.conf as /etc/sysctl.d/90-coremq.conf."
exit 0
