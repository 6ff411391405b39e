# The control plane on ECS Fargate: one task (the broker is embedded; see DESIGN.md "When one
# machine is not enough" for scaling out), secrets from Secrets Manager, /data on EFS, logs in
# CloudWatch.

resource "aws_ecs_cluster" "main" {
  name = local.name

  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_cloudwatch_log_group" "companion" {
  name              = "/ecs/${local.name}"
  retention_in_days = var.log_retention_days
}

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
  }
}

# Execution role: pull the image, write logs, read the three secrets.
resource "aws_iam_role" "execution" {
  name               = "${local.name}-execution"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

resource "aws_iam_role_policy_attachment" "execution" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

data "aws_iam_policy_document" "read_secrets" {
  statement {
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [
      aws_secretsmanager_secret.database_url.arn,
      aws_secretsmanager_secret.admin_token.arn,
      aws_secretsmanager_secret.jwt_secret.arn,
    ]
  }
}

resource "aws_iam_role_policy" "read_secrets" {
  name   = "read-secrets"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.read_secrets.json
}

# Task role: mount the data volume through its access point.
resource "aws_iam_role" "task" {
  name               = "${local.name}-task"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "efs_client" {
  statement {
    actions   = ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite"]
    resources = [aws_efs_file_system.data.arn]

    condition {
      test     = "StringEquals"
      variable = "elasticfilesystem:AccessPointArn"
      values   = [aws_efs_access_point.data.arn]
    }
  }
}

resource "aws_iam_role_policy" "efs_client" {
  name   = "efs-client"
  role   = aws_iam_role.task.id
  policy = data.aws_iam_policy_document.efs_client.json
}

resource "aws_ecs_task_definition" "companion" {
  family                   = local.name
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.task_cpu
  memory                   = var.task_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  volume {
    name = "data"

    efs_volume_configuration {
      file_system_id     = aws_efs_file_system.data.id
      transit_encryption = "ENABLED"

      authorization_config {
        access_point_id = aws_efs_access_point.data.id
        iam             = "ENABLED"
      }
    }
  }

  container_definitions = jsonencode([
    {
      name      = "companion"
      image     = var.image
      essential = true
      command   = ["serve"]

      portMappings = [
        { containerPort = 8000, protocol = "tcp" },
        { containerPort = 8883, protocol = "tcp" },
      ]

      environment = [
        { name = "COMPANION_DATA_DIR", value = "/data" },
        { name = "COMPANION_HTTP__LISTEN", value = "0.0.0.0:8000" },
        { name = "COMPANION_MQTT__TLS_LISTEN", value = "0.0.0.0:8883" },
        { name = "COMPANION_MQTT__HOSTS", value = var.public_hostname },
        { name = "COMPANION_LOG__FORMAT", value = "json" },
        { name = "RUST_LOG", value = "info" },
      ]

      secrets = [
        { name = "DATABASE_URL", valueFrom = aws_secretsmanager_secret.database_url.arn },
        { name = "COMPANION_ADMIN__TOKEN", valueFrom = aws_secretsmanager_secret.admin_token.arn },
        { name = "COMPANION_ADMIN__JWT_SECRET", valueFrom = aws_secretsmanager_secret.jwt_secret.arn },
      ]

      mountPoints = [
        { sourceVolume = "data", containerPath = "/data", readOnly = false },
      ]

      healthCheck = {
        command     = ["CMD", "companion", "health"]
        interval    = 15
        timeout     = 5
        retries     = 3
        startPeriod = 30
      }

      stopTimeout = 15

      logConfiguration = {
        logDriver = "awslogs"
        options   = {
          awslogs-group         = aws_cloudwatch_log_group.companion.name
          awslogs-region        = var.region
          awslogs-stream-prefix = "companion"
        }
      }
    }
  ])
}

resource "aws_ecs_service" "companion" {
  name            = "companion"
  cluster         = aws_ecs_cluster.main.id
  task_definition = aws_ecs_task_definition.companion.arn
  launch_type     = "FARGATE"

  # One broker: stop the old task before starting the new one (a short reconnect for devices,
  # whose agents buffer offline) rather than splitting the fleet over two brokers.
  desired_count                      = 1
  deployment_minimum_healthy_percent = 0
  deployment_maximum_percent         = 100
  health_check_grace_period_seconds  = 60

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  network_configuration {
    subnets          = aws_subnet.private[*].id
    security_groups  = [aws_security_group.service.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.api.arn
    container_name   = "companion"
    container_port   = 8000
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.mqtts.arn
    container_name   = "companion"
    container_port   = 8883
  }

  depends_on = [
    aws_lb_listener.https,
    aws_lb_listener.mqtts,
    aws_efs_mount_target.data,
  ]
}
