#!/bin/sh
# Refuses to start Kiln's stack with a secret that is unset, still infra/env.example's
# placeholder (anything containing `change-me`), or shorter than 12 characters.
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
  case "$value" in
    "")
      echo "kiln: refusing to start: $name is not set (set it in infra/.env)" >&2
      status=1
      ;;
    *change-me*)
      echo "kiln: refusing to start: $name is still the example value (change-me...) from infra/env.example; set a real secret in infra/.env" >&2
      status=1
      ;;
    *)
      if [ "${#value}" -lt 12 ]; then
        echo "kiln: refusing to start: $name is shorter than 12 characters" >&2
        status=1
      fi
      ;;
  esac
done
if [ "$status" -eq 0 ]; then
  echo "kiln: secrets checked: $*"
fi
exit "$status"
