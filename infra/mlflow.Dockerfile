# MLflow tracking server with the PostgreSQL driver and S3 (MinIO) client it needs.
FROM python:3.11-slim
RUN pip install --no-cache-dir 'mlflow>=3.17,<3.18' psycopg2-binary boto3
