variable "region" {
  description = "AWS region."
  type        = string
  default     = "eu-west-1"
}

variable "environment" {
  description = "Deployment name, used in resource names (e.g. prod, staging)."
  type        = string
  default     = "prod"
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC; split into two public and two private subnets."
  type        = string
  default     = "10.40.0.0/16"
}

variable "image" {
  description = "Container image of the control plane (built from ops/Dockerfile), e.g. 123456789012.dkr.ecr.eu-west-1.amazonaws.com/companion:1.0.0."
  type        = string
}

variable "public_hostname" {
  description = "DNS name devices and admins use (a CNAME to the load balancer); goes into the MQTT certificate and registration answers."
  type        = string
}

variable "api_certificate_arn" {
  description = "ACM certificate for public_hostname, used by the load balancer's TLS listener on 443."
  type        = string
}

variable "allowed_cidrs" {
  description = "Client networks allowed to reach 443 and 8883."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "task_cpu" {
  description = "Fargate task CPU units."
  type        = number
  default     = 1024
}

variable "task_memory" {
  description = "Fargate task memory (MiB)."
  type        = number
  default     = 2048
}

variable "db_instance_class" {
  description = "RDS instance class."
  type        = string
  default     = "db.t4g.medium"
}

variable "db_allocated_storage" {
  description = "RDS storage (GiB)."
  type        = number
  default     = 50
}

variable "db_backup_retention_days" {
  description = "Days of automated RDS backups (point-in-time recovery window)."
  type        = number
  default     = 14
}

variable "log_retention_days" {
  description = "CloudWatch log retention."
  type        = number
  default     = 30
}
