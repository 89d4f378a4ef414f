#!/bin/sh
# Refuses to start Kiln's stack with a secret that is unset, still infra/env.example's
# placeholder (anything containing `change-me`, in any letter case), or shorter than 12
# characters (POSTGRES_PASSWORD: also anything but letters, digits, - and _, which the
# database URLs would misread). A user:password string (PREFECT_AUTH_STRING) is measured
# by its password: a long user name made "administrator:1234567" pass.
# compose runs it as the one-shot `secrets-check` service; every other service waits
# for it to succeed. Usage: refuse-example-secrets.sh VAR [VAR...]  (variable names)
status=0
for name in "$@"; do
  case "$name" in
    "" | [0-9]* | *[!A-Za-z0-9_]*)
      echo "kiln: refusing to start: '$name' is not a variable name" >&2
      status=1
      continue
      ;;
  esac
  eval "value=\${$name-}"
  case "$name" in
    *AUTH_STRING) secret="${value#*:}" what="the password in $name" ;;
    *) secret="$value" what="$name" ;;
  esac
  lowered=$(printf '%s' "$value" | tr '[:upper:]' '[:lower:]')
  if [ -z "$value" ]; then
    echo "kiln: refusing to start: $name is not set (set it in infra/.env)" >&2
    status=1
  elif case "$lowered" in *change-me*) true ;; *) false ;; esac; then
    echo "kiln: refusing to start: $name is still the example value (change-me...) from infra/env.example; set a real secret in infra/.env" >&2
    status=1
  elif [ "${#secret}" -lt 12 ]; then
    echo "kiln: refusing to start: $what is shorter than 12 characters" >&2
    status=1
  elif [ "$name" = POSTGRES_PASSWORD ] && case "$value" in *[!A-Za-z0-9_-]*) true ;; *) false ;; esac; then
    # it goes into the database URLs unquoted: an `@` made `kiln@postgres` the host
    echo "kiln: refusing to start: POSTGRES_PASSWORD goes into database URLs: use letters, digits, - and _ only" >&2
    status=1
  fi
done
if [ "$status" -eq 0 ]; then
  echo "kiln: secrets checked: $*"
fi
exit "$status"
