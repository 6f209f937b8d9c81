# shellcheck shell=bash
# Shared helpers for the scripts in scripts/ (sourced, never run on its own).
# Every script validates its environment-variable inputs up front, so a typo fails in the shell
# with the variable's name instead of minutes later inside a Ray worker.

die() {
    echo "error: $*" >&2
    exit 2
}

# need_int NAME [MIN]: $NAME must be an integer >= MIN (default 1).
need_int() {
    local name=$1 min=${2:-1} value=${!1-}
    [[ $value =~ ^(0|[1-9][0-9]*)$ ]] || die "$name must be a non-negative integer, got '$value' (set $name=<int>)"
    ((10#$value >= min)) || die "$name must be >= $min, got $value"
}

# need_num NAME: $NAME must be a plain decimal or scientific number (1e-6, 0.28, 3).
need_num() {
    local name=$1 value=${!1-}
    [[ $value =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] ||
        die "$name must be a non-negative number like 1e-6 or 0.2, got '$value' (set $name=<number>)"
}

need_file() {
    local name=$1 path=$2
    [[ -f $path ]] || die "$name: file '$path' does not exist"
}

# print_cmd ARGS...: one line, "+ " then the command shell-quoted, so it can be copied or parsed back.
print_cmd() {
    local out="+"
    local arg
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:=,@+-]+$ ]]; then
            out+=" $arg"
        else
            out+=" $(printf '%q' "$arg")"
        fi
    done
    echo "$out"
}

# need_shell_safe WHAT ARGS...: every argument must survive `ray job submit`, which joins the entrypoint
# with Windows-style quoting (subprocess.list2cmdline) and runs it with shell=True on the head: '&', '$',
# ';', quotes or spaces would be read by that shell. Secrets belong in env vars (Secrets), never in flags.
need_shell_safe() {
    local what=$1 arg
    shift
    for arg in "$@"; do
        [[ $arg =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]] ||
            die "$what: '$arg' has characters a shell would interpret (ray job submit runs the command with shell=True); use a value of letters, digits and ._/:=,@+%- only"
    done
}

# run_or_print ARGS...: print the command; run it unless DRY_RUN=1 (print-only mode, used by the tests).
run_or_print() {
    print_cmd "$@"
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        return 0
    fi
    "$@"
}
