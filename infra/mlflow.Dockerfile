# MLflow tracking server with basic auth (the `auth` extra), the PostgreSQL driver
# SQLAlchemy picks for postgresql:// (psycopg 3) and the S3 (MinIO) client.
FROM python:3.11-slim
RUN pip install --no-cache-dir 'mlflow[auth]==3.17.2' 'psycopg[binary]>=3.2,<4' boto3
