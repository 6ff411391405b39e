output "load_balancer_dns_name" {
  description = "Point public_hostname (CNAME or alias) here."
  value       = aws_lb.main.dns_name
}

output "api_url" {
  description = "CONTROL_PLANE_URL for register_device.sh, setup_device.sh and smoke.sh."
  value       = "https://${var.public_hostname}"
}

output "mqtt_url" {
  description = "What devices connect to (the agent's CONTROL_PLANE_URL)."
  value       = "mqtts://${var.public_hostname}:8883"
}

output "database_endpoint" {
  description = "RDS endpoint (private subnets only)."
  value       = aws_db_instance.main.address
}

output "admin_token_secret_arn" {
  description = "Secrets Manager secret holding the bootstrap admin token (aws secretsmanager get-secret-value --secret-id ...)."
  value       = aws_secretsmanager_secret.admin_token.arn
}

output "database_url_secret_arn" {
  description = "Secrets Manager secret holding DATABASE_URL."
  value       = aws_secretsmanager_secret.database_url.arn
}

output "ecs_cluster_name" {
  value       = aws_ecs_cluster.main.name
  description = "ECS cluster, for aws ecs execute-command and update-service."
}

output "log_group" {
  description = "CloudWatch log group of the service."
  value       = aws_cloudwatch_log_group.companion.name
}
