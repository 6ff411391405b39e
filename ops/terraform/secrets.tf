# Secrets Manager: the database URL, the bootstrap admin token and the JWT signing key. The task
# receives them as environment variables through the execution role; they never appear in the
# task definition. Generated values live in the Terraform state too: keep the state encrypted
# and access-controlled (see the backend block in versions.tf).

resource "random_password" "admin_token" {
  length  = 64
  special = false
}

resource "random_password" "jwt_secret" {
  length  = 64
  special = false
}

resource "aws_secretsmanager_secret" "database_url" {
  name                    = "${local.name}/database-url"
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "database_url" {
  secret_id     = aws_secretsmanager_secret.database_url.id
  secret_string = "postgres://companion:${random_password.db.result}@${aws_db_instance.main.address}:${aws_db_instance.main.port}/companion"
}

resource "aws_secretsmanager_secret" "admin_token" {
  name                    = "${local.name}/admin-token"
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "admin_token" {
  secret_id     = aws_secretsmanager_secret.admin_token.id
  secret_string = random_password.admin_token.result
}

resource "aws_secretsmanager_secret" "jwt_secret" {
  name                    = "${local.name}/jwt-secret"
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "jwt_secret" {
  secret_id     = aws_secretsmanager_secret.jwt_secret.id
  secret_string = random_password.jwt_secret.result
}
