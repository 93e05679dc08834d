# Sourced by tests/stack/run.sh and tests/cluster/run.sh (CI runs both at once, each in its own range).
#   stack_ports LOW HIGH   export STACK_PG_PORT, STACK_MON_PORT, STACK_RGW_PORT and STACK_MLFLOW_PORT
#                          (each one not set already): four different ports in [LOW, HIGH) that no TCP
#                          socket uses, listening or connected.
# The range must lie below the kernel's ephemeral ports: every outgoing connection, and every server of
# the main suite that binds port 0, takes its port from those, and could take a port picked here before
# the stack's server binds it (mlflow: "[Errno 98] Address already in use").
stack_ports() {
    local low=$1 high=$2 ephemeral name var p i taken=" "
    read -r ephemeral _ < /proc/sys/net/ipv4/ip_local_port_range
    if ((high > ephemeral)); then
        echo "stack_ports: ports $low-$high reach into the kernel's ephemeral ports (from $ephemeral)" >&2
        return 1
    fi
    for name in PG MON RGW MLFLOW; do
        var=STACK_${name}_PORT
        if [[ -n ${!var:-} ]]; then taken+="${!var} "; continue; fi
        for ((i = 0; i < 200; i++)); do   # bounded
            p=$((low + RANDOM % (high - low)))
            [[ $taken == *" $p "* ]] || ss -tanH "( sport = :$p )" | grep -q . || break
        done
        ((i < 200)) || { echo "stack_ports: no free port in $low-$high" >&2; return 1; }
        export "$var=$p"
        taken+="$p "
    done
}
