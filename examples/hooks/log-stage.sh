#!/bin/sh
# An admin hook for the exec driver: Tern runs it at every feature stage with
# TERN_VM, TERN_STAGE, TERN_ATTEMPT, TERN_MIGRATION, TERN_HOST and
# TERN_FEATURE in the environment. Exit 0 for success; the last line of
# stdout (or of stderr on failure) is what the operator sees.
echo "$(date -u +%FT%TZ) $TERN_HOST $TERN_STAGE $TERN_VM attempt $TERN_ATTEMPT" >> "${TMPDIR:-/tmp}/tern-hook.log"
echo "logged $TERN_STAGE of $TERN_VM"
