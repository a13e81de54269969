#!/bin/sh
# Entrypoint of the monolith_tf model server image: the same contract as the
# stock tensorflow/serving image, so the two images are interchangeable.
#
#   docker run ... IMAGE                        serves /models/$MODEL_NAME
#   docker run ... IMAGE --model_config_file=/models/models.config [flags]
#
# Extra arguments are passed on to tensorflow_model_server; when a
# --model_config_file is given the server takes the models from it and ignores
# --model_name/--model_base_path (as the stock image does).
set -e
exec /usr/bin/tensorflow_model_server \
  --port="${GRPC_PORT:-8500}" \
  --rest_api_port="${REST_API_PORT:-8501}" \
  --model_name="${MODEL_NAME:-model}" \
  --model_base_path="${MODEL_BASE_PATH:-/models}/${MODEL_NAME:-model}" \
  "$@"
